"""A long, readable, deterministic English document for demos, tests and benchmarks.

A charter agreement between a shipowner and a merchant (numbered clauses with parties, amounts and
dates), followed by the ship's log of the voyage (dated entries with positions, weather, cargo and
crew). Every name, date and amount comes from a seeded generator, so the same (length, seed) gives
the same text on any machine, and questions about details deep inside have definite answers.
"""
from __future__ import annotations

import datetime as _dt
import random
from typing import List, Optional

WORDS_PER_TOKEN = 0.70  # measured with the demo tokenizer: n_tokens ~ n_words / 0.70

_FIRST = ["Amelia", "Bartholomew", "Clara", "Desmond", "Eleanor", "Fergus", "Greta", "Horace",
          "Isadora", "Jasper", "Katarina", "Leopold", "Mirabel", "Nathaniel", "Ottilie",
          "Percival", "Quentin", "Rosalind", "Silas", "Theodora", "Ulric", "Violet", "Wendell",
          "Ximena", "Yusuf", "Zenobia"]
_LAST = ["Ashcombe", "Blackwood", "Carrow", "Dunmore", "Everly", "Fairweather", "Greaves",
         "Holloway", "Ingram", "Jessop", "Kestrel", "Langley", "Marchbank", "Northcote",
         "Oakhurst", "Pemberton", "Quayle", "Rutherford", "Sinclair", "Thorne", "Underhill",
         "Vance", "Whitlock", "Yardley"]
_PORTS = ["Lisbon", "Valparaiso", "Bristol", "Cape Town", "Halifax", "Marseille", "Bombay",
          "Batavia", "Montevideo", "Genoa", "Bergen", "Zanzibar", "Boston", "Kingston",
          "Hobart", "Archangel"]
_CARGO = ["bales of cotton", "casks of Madeira wine", "crates of tea", "barrels of salt pork",
          "bolts of silk", "sacks of coffee", "tons of copper ore", "chests of indigo",
          "hogsheads of tobacco", "bundles of cinnamon", "casks of whale oil", "crates of porcelain"]
_WEATHER = ["a fresh breeze from the south-west", "light airs and a long swell",
            "a moderate gale with heavy rain", "fog so thick the bowsprit could not be seen",
            "clear skies and a steady trade wind", "squalls from the north-east",
            "a flat calm under a hot sun", "hail and a falling glass"]
_DUTIES = ["mended the fore topsail", "pumped the bilges", "tarred the standing rigging",
           "restowed the cargo in the after hold", "scraped and painted the quarterdeck",
           "overhauled the larboard anchor cable", "caulked a seam near the waterline",
           "exercised the great guns", "took soundings every half hour",
           "shifted the water casks to trim the ship"]
_EVENTS = ["sighted a sail to windward which did not answer our signal",
           "passed a quantity of floating timber", "saw a school of porpoises off the bow",
           "spoke the brig {ship2} bound for {port2}, all well aboard",
           "found two casks of bread spoiled by damp and condemned them",
           "caught a shark of some eight feet and served it to the crew",
           "observed the longitude by lunar distance", "lost a studding-sail boom overboard",
           "punished a seaman for drunkenness with the loss of his grog"]
_HEADINGS = ["The Vessel", "The Voyage", "Freight", "Payment", "Loading and Discharge",
             "Demurrage", "Deviation", "Perils of the Sea", "Liens", "General Average",
             "Insurance", "Crew and Provisions", "Cancellation", "Arbitration", "Notices",
             "Ice and Quarantine", "Salvage", "Pilotage", "Substitution", "Governing Law"]
_CLAUSES = [
    "The Owner shall deliver the ship {ship} at the port of {port}, tight, staunch and strong, "
    "on or before {date}.",
    "The Merchant shall pay freight at the rate of {amount} per ton of {cargo} delivered.",
    "Payment of {amount} shall be made to {name} in {port} within {days} days of discharge.",
    "Should the vessel be detained beyond {days} running days, demurrage shall be paid at "
    "{amount} per day, day by day.",
    "The master, {master}, shall proceed with all convenient speed and shall not deviate except "
    "to save life or property.",
    "No more than {qty} {cargo} shall be stowed upon deck, and then at the Merchant's risk.",
    "Any dispute shall be referred to two arbitrators in {port}, one appointed by each party, "
    "whose award dated not later than {date} shall be final.",
    "Notice of readiness shall be given in writing to {name} between the hours of {hour} and "
    "{hour2} on a working day.",
    "The Owner shall have a lien upon the cargo for all freight, dead freight and demurrage, "
    "the sum not to exceed {amount}.",
    "If the ship is not ready to load by {date}, the Merchant may cancel this agreement by "
    "letter to {name}.",
    "Provisions for {qty} days and wages for a crew of {crew} are for the Owner's account.",
    "Losses by fire, barratry of the master or mariners, and all perils of the seas are "
    "mutually excepted.",
]


def _name(r: random.Random) -> str:
    return f"{r.choice(_FIRST)} {r.choice(_LAST)}"


def _amount(r: random.Random) -> str:
    return f"{r.randint(2, 9999):,} pounds {r.randint(0, 19)} shillings"


def _fill(r: random.Random, template: str, ship: str, day: _dt.date, master: str) -> str:
    return template.format(
        ship=ship, master=master, ship2=f"{r.choice(_LAST)}", port=r.choice(_PORTS), port2=r.choice(_PORTS),
        date=(day + _dt.timedelta(days=r.randint(1, 400))).strftime("%d %B %Y"),
        amount=_amount(r), cargo=r.choice(_CARGO), name=_name(r), days=r.randint(2, 60),
        qty=r.randint(10, 900), hour=f"{r.randint(6, 11)} in the morning",
        hour2=f"{r.randint(1, 6)} in the afternoon", crew=r.randint(12, 60))


def sample_document(n_words: Optional[int] = 2000, seed: int = 0,
                    n_tokens: Optional[int] = None) -> str:
    """About `n_words` words (or about `n_tokens` BPE tokens when given) of text; deterministic."""
    if n_tokens is not None:
        n_words = max(1, int(n_tokens * WORDS_PER_TOKEN))
    if n_words is None or n_words < 1:
        raise ValueError(f"n_words ({n_words}) must be >= 1 (or give n_tokens)")
    r = random.Random(seed)
    ship = f"{r.choice(['Good Hope', 'Fortitude', 'Morning Star', 'Endeavour', 'Perseverance'])}"
    owner, merchant, master = _name(r), _name(r), _name(r)
    start = _dt.date(1790 + r.randint(0, 60), r.randint(1, 12), r.randint(1, 28))
    parts: List[str] = [
        f"CHARTER PARTY AND LOG OF THE SHIP {ship.upper()}\n\n"
        f"This agreement is made at {r.choice(_PORTS)} on {start.strftime('%d %B %Y')} between "
        f"{owner}, owner of the good ship {ship} of {r.randint(180, 900)} tons burthen, and "
        f"{merchant}, merchant, the master being {master}.\n"]
    words = len(parts[0].split())
    n_clauses = max(3, min(60, n_words // 400))
    clause = 0
    day = start
    entry = 0
    while words < n_words:
        if clause < n_clauses:
            clause += 1
            head = f"\nClause {clause}. {_HEADINGS[(clause - 1) % len(_HEADINGS)]}.\n"
            body = " ".join(_fill(r, r.choice(_CLAUSES), ship, start, master)
                            for _ in range(r.randint(2, 4)))
            text = head + f"{clause}.1 " + body + "\n"
            if clause == n_clauses:
                text += (f"\nSigned {owner}, Owner. Signed {merchant}, Merchant. Witnessed by "
                         f"{_name(r)}.\n\nTHE LOG\n")
        else:
            entry += 1
            day += _dt.timedelta(days=1)
            lat, lon = r.uniform(-60, 60), r.uniform(-180, 180)
            sents = [f"\nEntry {entry}. {day.strftime('%A %d %B %Y')}. Latitude "
                     f"{abs(lat):.2f} {'N' if lat >= 0 else 'S'}, longitude {abs(lon):.2f} "
                     f"{'E' if lon >= 0 else 'W'}.",
                     f"Wind and weather: {r.choice(_WEATHER)}.",
                     f"Made {r.randint(20, 240)} miles since noon yesterday."]
            for _ in range(r.randint(1, 3)):
                sents.append(f"{_name(r)}, seaman, {r.choice(_DUTIES)}.")
            if r.random() < 0.6:
                sents.append("We " + _fill(r, r.choice(_EVENTS), ship, day, master) + ".")
            if r.random() < 0.3:
                sents.append(f"Remaining aboard: {r.randint(10, 900)} {r.choice(_CARGO)}, "
                             f"water for {r.randint(5, 90)} days.")
            text = " ".join(sents) + f" Signed {master}, master.\n"
        parts.append(text)
        words += len(text.split())
    return "".join(parts)

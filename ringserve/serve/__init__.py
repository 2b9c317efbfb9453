"""ringserve's HTTP service: a Ray Serve application (FastAPI ingress) in front of `LLM`.

`build_app(args)` is the import path of the serve config (`ringserve.serve:build_app`; args are
`ServeArgs`' fields, checked with clear errors); `run(model, ...)` starts it locally for
`ringserve serve` and the demo. Importing this package does not import Ray.

One replica owns one LLM (one actor group of world_size shard actors in a placement group);
num_replicas > 1 adds a small shared document registry (registry.py). A replica runs one request
at a time on its group; up to max_queue more wait (beyond: 429); each request has
request_timeout_s for waiting + prefill + decode (beyond: 504, and the engine stops it).

Endpoints (all /v1 ones need `Authorization: Bearer <api_key>` when api_key is set):

  GET  /health                     liveness (200 while the replica runs)
  GET  /ready                      200 once the model is loaded, else 503 (OpenAI error body)
  GET  /stats                      this replica's counters, queue, KV use, engine stats (JSON)
  GET  /v1/models, /v1/models/{m}  the served model (its name: model_name or the folder's)
  POST /v1/completions             OpenAI completions; prompt: text, ids, or a list of those
  POST /v1/chat/completions        OpenAI chat; the checkpoint's chat template
       both: stream=true -> server-sent events, OpenAI chunk format, ending `data: [DONE]`;
       stream_options.include_usage; seed; stop; n (1-128: the samples share the prompt's
       prefill and decode together; streamed choices interleave by index); logprobs: chat
       logprobs + top_logprobs (0-20), completions logprobs=k (0-5) -> the sampled token's and
       the k most likely tokens' log-probs under the model (before penalties and masks);
       completions: best_of (>= n; the n with the highest summed logprob; not streamed),
       echo (the prompt's text first; with logprobs, its tokens' log-probs from the score
       path, the first null, and null top_logprobs: no alternatives for prompt tokens);
       presence_penalty, frequency_penalty ([-2, 2], OpenAI's definitions, output tokens),
       logit_bias ({"token id": [-100, 100]}); structured output: response_format
       {"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": ...}}
       (the output parses and validates unless max_tokens cut it: finish_reason "length";
       an invalid schema is a 400 naming the problem); extensions (vLLM's names): top_k,
       ignore_eos, min_tokens, repetition_penalty (> 0, prompt and output tokens),
       guided_json, guided_regex, guided_choice, guided_grammar (Lark), stop_token_ids,
       return_token_ids (choices carry token_ids); usage.prompt_tokens_details.cached_tokens =
       prompt tokens served from the KV cache. Still 400: tools, suffix, audio/image parts.
  POST /tokenize                   vLLM's: {"prompt"} or {"messages", "add_generation_prompt"},
                                   "add_special_tokens" (default true, as the endpoints encode),
                                   "return_token_strs" -> {"count", "max_model_len" (the KV
                                   capacity), "tokens"[, "token_strs"]}
  POST /detokenize                 {"tokens"} -> {"prompt"} (special tokens kept)
  POST /v1/documents               {"text"} | {"token_ids": [...]} as JSON or msgpack (in
                                   msgpack token_ids may be little-endian uint32 bytes), or a
                                   multipart upload (field "file", UTF-8 text; optional "name")
                                   -> {"id", "object": "document", "num_tokens", "status",
                                   "prefill_s", ...} prefilled once and pinned in the engine's
                                   document cache. wait=false (body field or ?wait=false): 202
                                   at once with status "prefilling"; GET shows "ready" or
                                   "failed" (+ error); questions asked meanwhile queue behind it.
                                   prompt_format "plain" (default) or "chat" (the checkpoint's
                                   chat template, optional "system"): see doc_prompts.py
  GET  /v1/documents[/{id}]        list / one document's card
  DELETE /v1/documents/{id}        unpin and forget it; later questions get 404
  POST /v1/documents/{id}/ask      {"question", "max_tokens", "temperature", "stream", ...} ->
                                   {"answer", "finish_reason", "num_cached_tokens", "usage",
                                   "timings"}; streaming: SSE "document.answer.chunk" events
                                   with "delta", the last one carrying the same summary fields

  GET  /openapi.json                the API schema (needs the key like /v1; no /docs pages)

msgpack requests get msgpack answers (also when Accept asks for application/msgpack). Errors
are always JSON in OpenAI's shape {"error": {"message", "type", "param", "code",
"request_id"}}: a stable code, a short message written by the service (never an exception's own
text from the server side) and the request id (Serve's x-request-id header; the replica's log
has the details under it). 400 invalid parameters (code context_length_exceeded for prompts
beyond the KV cache: text that can not fit is refused before it is tokenized;
too_many_prompts past max_prompts; integers and booleans are strict), 401 API key, 404
model / document / route, 408 body_timeout (a body pausing longer than body_timeout_s, or
slower than min_body_rate bytes/s after that), 409 a question on a document whose background
prefill failed, 413 document beyond the KV capacity (both numbers in the message) or
body beyond max_body_mb, 415 content type, 429 queue full, 503 model loading / load failed /
a shard actor failed (the group is rebuilt), 504 timeout. A client that disconnects counts as
"cancelled" in the metrics. A stream starts when its first token
is ready, or after sse_keepalive_s with ": keep-alive" SSE comments until then (a long prefill);
after the start an error arrives as a `data: {"error": ...}` event. A client that disconnects
cancels its generation.

Metrics (ray.util.metrics, exported by Ray's Prometheus endpoint on each node, prefixed ray_):
ringserve_requests (endpoint, outcome), ringserve_time_to_first_token_seconds,
ringserve_decode_tokens_per_second, ringserve_generated_tokens, ringserve_prompt_tokens (cached),
ringserve_queue_depth, ringserve_requests_running, ringserve_kv_tokens_used / _free.
"""
from ringserve.serve.config import ServeArgs
from ringserve.serve.launch import build_app, run, wait_ready

__all__ = ["ServeArgs", "build_app", "run", "wait_ready"]

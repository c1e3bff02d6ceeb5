"""The rollout server's JSON protocol: request validation, response layout, OpenAPI schema.

Pure host code (no jax, no HTTP) so both backends' servers and the client share one
definition. The request accepts every field the reference trainer's client sends
(REFERENCE_SPEC 3.4); fields we cannot honour are accepted only at their neutral value
(e.g. `frequency_penalty: 0.0`) and refused otherwise, so a request never silently means
something else than it says.
"""

from __future__ import annotations

import dataclasses
import json
import math
import reprlib
import urllib.parse
from typing import Any, Sequence

from maxent_jax.rollout.backend import Completion, SamplingParams

CLIENT_TAG_HEADER = "X-VLLM-Client-Tag"
WEIGHT_VERSION_HEADER = "X-Weight-Version"

# Weight layouts of a push (`POST /weights?layout=...`). `hf`: Hugging Face names and layouts,
# what every backend takes. `native`: the same names, each tensor in the shape of the server's
# own parameter (our [in, out] kernels), offered only by a backend that holds our model, so
# neither side transposes. Always said explicitly: a square kernel reads as either. `lora`: a
# LoRA policy's adapters alone, on a base the server already holds (rollout/adapters.py), with
# the adapter's query parameters LORA_PARAMS.
LAYOUT_PARAM = "layout"
HF_LAYOUT = "hf"
NATIVE_LAYOUT = "native"
LORA_LAYOUT = "lora"
WEIGHT_LAYOUTS = (HF_LAYOUT, NATIVE_LAYOUT, LORA_LAYOUT)
LORA_PARAMS = ("rank", "alpha", "targets", "base")


# Integers reach numpy and jax as fixed-width ints: token ids, n, max_tokens, top_k and
# best_of must fit in int32, a seed in int64 (and be >= 0: numpy's SeedSequence takes no
# negative entropy). A larger JSON integer was a 500 OverflowError deep in the engine.
INT32_LIMIT = 2**31
SEED_LIMIT = 2**63
# Stop strings and stop token ids per request: each is checked on every generated token (ids in
# the decode loop, strings on decoded text), so their number is work the token limit does not
# see. The reference client sends three.
MAX_STOPS = 64

# Values echoed in an error message are shown this small (a 16 MB list is not repeated back,
# and a deeply nested one is not walked to the bottom).
_PREVIEW = reprlib.Repr()
_PREVIEW.maxlevel, _PREVIEW.maxlist, _PREVIEW.maxdict = 2, 6, 6
_PREVIEW.maxstring, _PREVIEW.maxother, _PREVIEW.maxlong = 60, 60, 40


class ProtocolError(ValueError):
    """A request the server refuses; `status` is the HTTP status, the message names the field.

    `details` are extra fields of the JSON error body (e.g. the server's `limits`, so a client
    can split a request that was too large).
    """

    def __init__(self, message: str, status: int = 400, details: dict | None = None):
        super().__init__(message)
        self.status = status
        self.details = details or {}


def preview(value: Any) -> str:
    """A short repr of a request value for an error message."""
    return _PREVIEW.repr(value)


def decode_json(raw: bytes) -> Any:
    """The JSON value of a request body; a body that is not JSON, or nests too deep, is a ProtocolError."""
    try:
        return json.loads(raw.decode("utf-8"))
    except ValueError as err:  # not UTF-8, not JSON, or an integer of more digits than Python parses
        raise ProtocolError(f"request body is not valid JSON: {err}") from None
    except RecursionError:
        raise ProtocolError("request body nests JSON arrays/objects too deeply; a /generate request needs at most 3 levels") from None


def parse_weight_layout(query: str, offered: Sequence[str], backend: str) -> str:
    """The layout a `POST /weights` asks for in its query string (none: `hf`), if this server offers it."""
    fields = urllib.parse.parse_qs(query, keep_blank_values=True)
    values = fields.get(LAYOUT_PARAM, [HF_LAYOUT])
    valid = {LAYOUT_PARAM, *(LORA_PARAMS if values == [LORA_LAYOUT] else ())}
    unknown = sorted(set(fields) - valid)
    if unknown:
        raise ProtocolError(f"POST /weights: unknown query parameter {unknown[0]!r}; valid: "
                            + ", ".join(map(repr, sorted(valid))))
    if len(values) != 1:
        raise ProtocolError(f"query parameter {LAYOUT_PARAM!r} given {len(values)} times; give it once")
    layout = values[0]
    if layout not in WEIGHT_LAYOUTS:
        raise ProtocolError(f"query parameter {LAYOUT_PARAM}={layout!r} is not a weight layout; valid: "
                            + ", ".join(map(repr, WEIGHT_LAYOUTS)))
    if layout not in offered:
        raise ProtocolError(f"query parameter {LAYOUT_PARAM}={layout!r}: the {backend} backend takes only "
                            + ", ".join(map(repr, offered)) + " (see weight_layouts in GET /info)")
    return layout


# Sampling fields: name -> (JSON type(s), default, description). Allowed both at the top
# level and inside `sampling_params` (the reference client sends them in both places).
_SAMPLING_FIELDS: dict[str, tuple[tuple[type, ...], Any, str]] = {
    "n": ((int,), 1, "completions per prompt, >= 1"),
    "max_tokens": ((int,), 256, "maximum completion tokens, >= 1"),
    "temperature": ((int, float), 1.0, "sampling temperature, >= 0 (0 = greedy)"),
    "top_p": ((int, float), 1.0, "nucleus mass in (0, 1]"),
    "top_k": ((int,), 0, "keep the k most likely tokens; 0 or -1 = all"),
    "stop": ((str, list), None, "stop string(s); the completion text ends before the first one"),
    "stop_token_ids": ((list,), None, "token ids that end a completion (kept in token_ids)"),
    "ignore_eos": ((bool,), False, "keep sampling past EOS"),
    "seed": ((int, type(None)), None, "PRNG seed; equal seeds give equal completions"),
    "logprobs": ((bool, int, type(None)), 1, "return per-token log-probs (any truthy value)"),
    "best_of": ((int, type(None)), None, "accepted only when null or equal to n"),
    "frequency_penalty": ((int, float, type(None)), 0.0, "accepted only as 0"),
    "presence_penalty": ((int, float, type(None)), 0.0, "accepted only as 0"),
}
# Top-level-only fields.
_REQUEST_FIELDS: dict[str, tuple[tuple[type, ...], Any, str]] = {
    "prompts": ((list,), None, "prompt strings (tokenized by the server)"),
    "prompt_token_ids": ((list,), None, "prompts as token-id lists; exactly one of prompts/prompt_token_ids"),
    "sampling_params": ((dict,), None, "the sampling fields, nested (must agree with top-level ones)"),
    "return_logprobs": ((bool,), True, "return per-token log-probs"),
    "client_tag": ((str, type(None)), None, "echoed in every result; the X-VLLM-Client-Tag header is used if absent"),
    "request_id": ((str, type(None)), None, "echoed in the response"),
    "stream": ((bool,), False, "accepted only as false"),
    "logit_bias": ((dict, type(None)), None, "accepted only as null or {}"),
    "guided_json": ((dict, str, type(None)), None, "accepted only as null"),
    "guided_regex": ((str, type(None)), None, "accepted only as null"),
}


@dataclasses.dataclass(frozen=True)
class GenerateRequest:
    """A validated /generate request: exactly one of `texts` / `token_ids` is set."""

    texts: list[str] | None
    token_ids: list[list[int]] | None
    params: SamplingParams
    client_tag: str | None
    request_id: str | None

    @property
    def num_prompts(self) -> int:
        return len(self.texts if self.texts is not None else self.token_ids)


def _check_type(field: str, value: Any, types: tuple[type, ...]) -> None:
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
        raise ProtocolError(f"field {field!r}: expected {names}, got {type(value).__name__} {preview(value)}")


def _merged_sampling(payload: dict) -> dict:
    nested = payload.get("sampling_params") or {}
    unknown = sorted(set(nested) - set(_SAMPLING_FIELDS))
    if unknown:
        raise ProtocolError(f"unknown field sampling_params.{unknown[0]}; valid: {sorted(_SAMPLING_FIELDS)}")
    merged = {}
    for name, (types, default, _) in _SAMPLING_FIELDS.items():
        values = [src[name] for src in (payload, nested) if name in src]
        for value in values:
            _check_type(name, value, types)
        if len(values) == 2 and values[0] != values[1]:
            raise ProtocolError(
                f"field {name!r}: top level says {values[0]!r} but sampling_params says {values[1]!r}"
            )
        merged[name] = values[0] if values else default
    return merged


def _int_list(field: str, value: Any) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ProtocolError(f"field {field!r}: expected a list of integers, got {preview(value)}")
    bad = [v for v in value if not 0 <= v < INT32_LIMIT]
    if bad:
        raise ProtocolError(f"field {field!r}: token ids must be in [0, 2**31), got {preview(bad[0])}")
    return list(value)


def _text(field: str, value: str) -> str:
    """`value` if it is text the tokenizer can take: a lone surrogate (JSON "\\ud800") is not."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ProtocolError(f"field {field!r}: not valid Unicode text ({err.reason} at character {err.start})") from None
    return value


def _as_float(field: str, value: int | float) -> float:
    try:
        return float(value)
    except OverflowError:
        raise ProtocolError(f"field {field!r}: {preview(value)} is too large for a float") from None


def _check_int_ranges(s: dict) -> None:
    """Bounds every integer sampling field, so no value overflows a fixed-width int downstream."""
    for name in ("n", "max_tokens", "top_k", "best_of"):
        if s[name] is not None and not -INT32_LIMIT <= s[name] < INT32_LIMIT:
            raise ProtocolError(f"field {name!r}: must fit in a 32-bit integer, got {preview(s[name])}")
    if s["seed"] is not None and not 0 <= s["seed"] < SEED_LIMIT:
        raise ProtocolError(f"field 'seed': must be in [0, 2**63), got {preview(s['seed'])}")


def parse_generate(payload: Any, header_tag: str | None = None) -> GenerateRequest:
    """Validate a decoded /generate body; raises ProtocolError naming the first bad field."""
    if not isinstance(payload, dict):
        raise ProtocolError(f"request body must be a JSON object, got {type(payload).__name__}")
    allowed = set(_REQUEST_FIELDS) | set(_SAMPLING_FIELDS)
    unknown = sorted(set(payload) - allowed)
    if unknown:
        raise ProtocolError(f"unknown field {unknown[0]!r}; valid fields: {sorted(allowed)}")
    for name, (types, _, _) in _REQUEST_FIELDS.items():
        if name in payload:
            _check_type(name, payload[name], types)
    s = _merged_sampling(payload)

    has_text, has_ids = payload.get("prompts") is not None, payload.get("prompt_token_ids") is not None
    if has_text == has_ids:
        raise ProtocolError("give exactly one of 'prompts' (strings) or 'prompt_token_ids' (lists of ints)")
    texts = token_ids = None
    if has_text:
        texts = payload["prompts"]
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ProtocolError(f"field 'prompts': expected a non-empty list of strings, got {preview(texts)}")
        texts = [_text(f"prompts[{i}]", t) for i, t in enumerate(texts)]
    else:
        raw = payload["prompt_token_ids"]
        if not raw:
            raise ProtocolError("field 'prompt_token_ids': expected a non-empty list of token-id lists")
        token_ids = [_int_list(f"prompt_token_ids[{i}]", ids) for i, ids in enumerate(raw)]
        empty = [i for i, ids in enumerate(token_ids) if not ids]
        if empty:
            raise ProtocolError(f"field 'prompt_token_ids[{empty[0]}]': a prompt needs at least one token")

    _check_int_ranges(s)
    if s["n"] < 1:
        raise ProtocolError(f"field 'n': must be >= 1, got {s['n']}")
    if s["max_tokens"] < 1:
        raise ProtocolError(f"field 'max_tokens': must be >= 1, got {s['max_tokens']}")
    if not (math.isfinite(_as_float("temperature", s["temperature"])) and s["temperature"] >= 0):
        raise ProtocolError(f"field 'temperature': must be finite and >= 0, got {s['temperature']}")
    if not 0 < s["top_p"] <= 1:
        raise ProtocolError(f"field 'top_p': must be in (0, 1], got {s['top_p']}")
    if s["top_k"] < -1:
        raise ProtocolError(f"field 'top_k': must be >= 1, or 0/-1 for no limit, got {s['top_k']}")
    if s["best_of"] not in (None, s["n"]):
        raise ProtocolError(f"field 'best_of': only null or n ({s['n']}) is supported, got {s['best_of']}")
    for name in ("frequency_penalty", "presence_penalty"):
        if s[name] not in (None, 0, 0.0):
            raise ProtocolError(f"field {name!r}: only 0 is supported, got {s[name]}")
    if payload.get("stream"):
        raise ProtocolError("field 'stream': only false is supported")
    if payload.get("logit_bias"):
        raise ProtocolError("field 'logit_bias': only null or {} is supported")
    for name in ("guided_json", "guided_regex"):
        if payload.get(name) is not None:
            raise ProtocolError(f"field {name!r}: guided decoding is not supported; send null")

    stop = s["stop"]
    stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if not all(isinstance(x, str) and x for x in stop):
        raise ProtocolError(f"field 'stop': expected non-empty strings, got {preview(list(stop))}")
    stop = tuple(_text("stop", x) for x in stop)
    stop_ids = tuple(_int_list("stop_token_ids", s["stop_token_ids"] or []))
    for name, values in (("stop", stop), ("stop_token_ids", stop_ids)):
        if len(values) > MAX_STOPS:
            raise ProtocolError(f"field {name!r}: {len(values)} entries; at most {MAX_STOPS} are accepted")
    want_logprobs = bool(payload.get("return_logprobs", True)) and bool(s["logprobs"] is None or s["logprobs"])
    params = SamplingParams(
        n=s["n"],
        max_tokens=s["max_tokens"],
        temperature=float(s["temperature"]),
        top_p=float(s["top_p"]),
        top_k=max(0, s["top_k"]),
        stop=stop,
        stop_token_ids=stop_ids,
        ignore_eos=s["ignore_eos"],
        seed=s["seed"],
        logprobs=want_logprobs,
    )
    tag = payload.get("client_tag")
    return GenerateRequest(
        texts=texts,
        token_ids=token_ids,
        params=params,
        client_tag=tag if tag is not None else header_tag,
        request_id=payload.get("request_id"),
    )


def completion_json(index: int, completion: Completion, client_tag: str | None, weight_version: int, with_logprobs: bool) -> dict:
    """One output; `metadata` carries what the reference client reads (REFERENCE_SPEC 3.4)."""
    out: dict[str, Any] = {
        "index": index,
        "text": completion.text,
        "token_ids": list(completion.token_ids),
        "finish_reason": completion.finish_reason,
        "client_tag": client_tag,
    }
    meta: dict[str, Any] = {"client_tag": client_tag, "token_count": len(completion.token_ids), "weight_version": weight_version}
    if with_logprobs:
        out["logprobs"] = [float(x) for x in completion.logprobs]
        sampling = getattr(completion, "sampling_logprobs", None)
        if sampling is not None:
            out["sampling_logprobs"] = [float(x) for x in sampling]
        meta["logprob_sum"] = float(sum(out["logprobs"]))
    out["metadata"] = meta
    return out


def generate_response(
    request: GenerateRequest,
    prompt_token_ids: list[list[int]],
    completions: list[list[Completion]],
    weight_version: int,
    model: str,
) -> dict:
    """The /generate response: one result per prompt, each with `n` outputs, all tagged."""
    tag = request.client_tag
    results = []
    for i, (ids, outs) in enumerate(zip(prompt_token_ids, completions, strict=True)):
        results.append(
            {
                "prompt_index": i,
                "client_tag": tag,
                "prompt_token_ids": ids,
                "outputs": [completion_json(j, c, tag, weight_version, request.params.logprobs) for j, c in enumerate(outs)],
            }
        )
    return {
        "request_id": request.request_id,
        "client_tag": tag,
        "model": model,
        "weight_version": weight_version,
        "results": results,
    }


def _field_schema(types: tuple[type, ...], description: str) -> dict:
    names = {int: "integer", float: "number", str: "string", bool: "boolean", list: "array", dict: "object", type(None): "null"}
    kinds = sorted({names[t] for t in types})
    return {"type": kinds[0] if len(kinds) == 1 else kinds, "description": description}


def openapi_schema() -> dict:
    """OpenAPI 3.1 description of the endpoints, generated from the same field tables as the validator."""
    sampling = {name: _field_schema(t, d) for name, (t, _, d) in _SAMPLING_FIELDS.items()}
    request = {name: _field_schema(t, d) for name, (t, _, d) in _REQUEST_FIELDS.items()}
    request["prompts"]["items"] = {"type": "string"}
    request["prompt_token_ids"]["items"] = {"type": "array", "items": {"type": "integer"}}
    request["sampling_params"] = {"type": "object", "properties": sampling, "additionalProperties": False}
    error = {"description": "refused; the body names the problem", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    ok_json = {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "maxent-jax rollout server", "version": "1"},
        "paths": {
            "/health": {"get": {"summary": "liveness", "responses": {"200": ok_json}}},
            "/info": {"get": {"summary": "model, backend, weight version, max lengths, weight_layouts", "responses": {"200": ok_json}}},
            "/generate": {
                "post": {
                    "summary": "sample n completions per prompt",
                    "parameters": [{"name": CLIENT_TAG_HEADER, "in": "header", "schema": {"type": "string"}}],
                    "requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/GenerateRequest"}}}},
                    "responses": {"200": {"description": "one result per prompt", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/GenerateResponse"}}}},
                                  "400": error, "408": error, "413": error, "429": error},
                }
            },
            "/weights": {
                "post": {
                    "summary": "replace all weights atomically (stream of one-tensor safetensors frames, see docs/rollout.md)",
                    "security": [{"bearer": []}],
                    "parameters": [
                        {"name": WEIGHT_VERSION_HEADER, "in": "header", "schema": {"type": "integer"}},
                        {"name": LAYOUT_PARAM, "in": "query", "schema": {"enum": list(WEIGHT_LAYOUTS), "default": HF_LAYOUT},
                         "description": "tensor layout of the push; only one listed in weight_layouts of GET /info"},
                        *({"name": name, "in": "query", "schema": {"type": "string"},
                           "description": f"adapter push (layout={LORA_LAYOUT!r}) only: the adapters' {name}"}
                          for name in LORA_PARAMS),
                    ],
                    "requestBody": {"required": True, "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
                    "responses": {"200": ok_json, "400": error, "401": error, "403": error, "408": error, "409": error, "413": error},
                }
            },
            "/reset_prefix_cache": {"post": {"summary": "forget cached attention", "responses": {"200": ok_json}}},
            "/openapi.json": {"get": {"summary": "this document", "responses": {"200": ok_json}}},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "GenerateRequest": {"type": "object", "properties": {**sampling, **request}, "additionalProperties": False},
                "GenerateResponse": {
                    "type": "object",
                    "properties": {
                        "request_id": {"type": ["string", "null"]},
                        "client_tag": {"type": ["string", "null"]},
                        "model": {"type": "string"},
                        "weight_version": {"type": "integer"},
                        "results": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "prompt_index": {"type": "integer"},
                                    "client_tag": {"type": ["string", "null"]},
                                    "prompt_token_ids": {"type": "array", "items": {"type": "integer"}},
                                    "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/Output"}},
                                },
                            },
                        },
                    },
                },
                "Output": {
                    "type": "object",
                    "properties": {
                        "index": {"type": "integer"},
                        "text": {"type": "string"},
                        "token_ids": {"type": "array", "items": {"type": "integer"}},
                        "logprobs": {"type": "array", "items": {"type": "number"}, "description": "model log-probs (temperature 1, full vocabulary) of the sampled tokens"},
                        "sampling_logprobs": {"type": "array", "items": {"type": "number"}, "description": "log-probs under the distribution actually sampled from (jax backend)"},
                        "finish_reason": {"enum": ["stop", "length"]},
                        "client_tag": {"type": ["string", "null"]},
                        "metadata": {"type": "object"},
                    },
                },
                "Error": {"type": "object", "properties": {"error": {"type": "string"}, "status": {"type": "integer"},
                                           "limits": {"type": "object", "description": "with a 413 for a request over the work limits: those of GET /info"}}},
            },
        },
    }

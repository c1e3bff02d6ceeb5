"""The trainer's client for a rollout server (jax or vllm backend): generate, push weights.

No jax at module level: the client is plain HTTP + JSON, so it can be imported anywhere.
What it adds over a bare HTTP call, following REFERENCE_SPEC 3.4-3.5 and fixing quirk Q4:
- a client_tag in the payload and the `X-VLLM-Client-Tag` header; results carrying another
  tag are dropped and counted, and a server that echoes no tag at all is an error (not a
  silent run on someone else's completions) unless `require_tag_echo=False`;
- retries with exponential backoff on connection errors, timeouts, 5xx and 429 (server
  busy); other 4xx and malformed responses fail at once (retrying cannot fix them); the
  final error names the URL, the attempts and the last status;
- a request over the server's limits (a 413 that carries them, see rollout/limits.py) is
  split into pieces that fit, and later requests are split before they are sent;
- prompts clipped by characters, completions regrouped per prompt, behaviour log-probs
  attached, latency and weight-staleness metrics;
- weight pushes streamed tensor by tensor (chunked HTTP body; see weights.py for framing), in
  our own parameter layout when the server offers it (no transposes on either side), else HF's.

This module is the transport (retries, chunked uploads) and the public `RolloutClient`; the
request body and the parsing of answers into Samples are `completions.py`'s, what a weight
push sends and how it is timed `push.py`'s.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import logging
import os
import time
import urllib.parse
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from maxent_jax.errors import UserError
from maxent_jax.rollout.adapters import AdapterSpec
from maxent_jax.rollout.backend import SamplingParams
from maxent_jax.rollout.completions import (ClientTagError, RolloutBatch, RolloutError, Sample, generate_payload, parse_results,
                                            prompt_char_limit, resolve_client_tag)
from maxent_jax.rollout.limits import RequestLimits, limits_from_json, piece_seed, split_request
from maxent_jax.rollout.protocol import CLIENT_TAG_HEADER, HF_LAYOUT, LORA_LAYOUT, NATIVE_LAYOUT
from maxent_jax.rollout.push import NamedTensors, TimedUpload, push_layout, push_report, push_request, send_chunked

log = logging.getLogger(__name__)


class _OverLimits(RolloutError):
    """The server refused a request for its size and said its limits (the client then splits)."""

    def __init__(self, message: str, limits: RequestLimits):
        super().__init__(message)
        self.limits = limits


def _json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except ValueError:
        return None


def base_url(url: str) -> str:
    """scheme://host:port of a server URL; a reference-style `.../generate` URL is accepted too."""
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"rollout server url {url!r}: expected http://host:port")
    return f"http://{parts.netloc}"


@dataclasses.dataclass
class _Reply:
    status: int
    body: bytes


class RolloutClient:
    """Talks to one rollout server. Thread-compatible: one request per call, fresh connection each time."""

    def __init__(
        self,
        url: str,
        *,
        client_tag: str | None = None,
        timeout: float = 240.0,
        max_retries: int = 3,
        backoff: float = 1.0,
        backoff_multiplier: float = 2.0,
        require_tag_echo: bool = True,
        token: str | None = None,
        max_prompt_length: int = 512,
        env: Mapping[str, str] = os.environ,
    ):
        if max_retries < 1:
            raise ValueError(f"max_retries={max_retries}: need at least 1 attempt")
        self.url = base_url(url)
        parts = urllib.parse.urlsplit(self.url)
        self._host, self._port = parts.hostname, parts.port or 80
        self.client_tag = resolve_client_tag(client_tag, env)
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.backoff_multiplier = backoff_multiplier
        self.require_tag_echo = require_tag_echo
        self.token = token
        self.char_limit = prompt_char_limit(max_prompt_length, env)
        self.dropped_foreign = 0  # results/outputs with another client's tag, over this client's life
        self.server_limits: RequestLimits | None = None  # learnt from the server's first 413 that names them

    @classmethod
    def from_config(cls, config: Any, *, url: str | None = None, token: str | None = None) -> "RolloutClient":
        """A client from the run config (`config.vllm.*`, `config.rollout.max_prompt_length`).

        `url` and `token` replace `vllm.url` and `vllm.token_file` (a server the trainer spawned).
        """
        v = config.vllm
        if token is None and v.token_file:
            try:
                with open(v.token_file, encoding="utf-8") as handle:
                    token = handle.read().strip() or None
            except OSError as err:
                raise UserError(f"config field vllm.token_file={v.token_file!r}: cannot read it ({err.strerror})") from None
        return cls(
            url or v.url,
            client_tag=v.client_tag or None,
            timeout=v.server_timeout,
            max_retries=v.max_retries,
            backoff=v.backoff,
            backoff_multiplier=v.backoff_multiplier,
            require_tag_echo=v.client_tag_fail_fast,
            token=token,
            max_prompt_length=config.rollout.max_prompt_length,
        )

    # -- transport ------------------------------------------------------------------------

    def _once(self, method: str, path: str, body: Any, headers: dict, chunked: bool = False) -> _Reply:
        conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
        try:
            try:
                if chunked:
                    conn.putrequest(method, path, skip_accept_encoding=True)
                    for key, value in headers.items():
                        conn.putheader(key, value)
                    conn.endheaders()
                    send_chunked(conn.sock, body)
                else:
                    conn.request(method, path, body=body, headers=headers)
            except (BrokenPipeError, ConnectionResetError):
                if not chunked:
                    raise
                # The server refused mid-upload (auth, validation) and closed: its answer may be waiting.
            response = conn.getresponse()
            return _Reply(response.status, response.read())
        finally:
            conn.close()

    def _call(
        self,
        method: str,
        path: str,
        body: Callable[[], Any] | None = None,
        headers: dict | None = None,
        *,
        attempts: int | None = None,
        chunked: bool = False,
    ) -> tuple[_Reply, int]:
        """One request with retries on transport errors and 5xx; returns (reply, attempts used).

        `body` makes the request body afresh for every attempt (a streamed body is consumed).
        """
        attempts = attempts or self.max_retries
        last = "no attempt"
        for attempt in range(1, attempts + 1):
            try:
                reply = self._once(method, path, body() if body else None, dict(headers or {}), chunked)
            except (OSError, http.client.HTTPException) as err:  # refused, reset, timeout
                last = f"{type(err).__name__}: {err}"
            else:
                if reply.status < 500 and reply.status != 429:  # 429: busy now, may not be later
                    return reply, attempt
                last = f"HTTP {reply.status}: {reply.body[:300].decode('utf-8', 'replace')}"
            if attempt < attempts:
                delay = self.backoff * self.backoff_multiplier ** (attempt - 1)
                log.warning("rollout %s %s%s attempt %d/%d failed (%s); retrying in %.2fs", method, self.url, path, attempt, attempts, last, delay)
                time.sleep(delay)
        raise RolloutError(f"rollout server {self.url}{path} failed after {attempts} attempt(s); last: {last}")

    def _json(self, reply: _Reply, path: str) -> Any:
        try:
            obj = json.loads(reply.body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise RolloutError(f"rollout server {self.url}{path} answered HTTP {reply.status} with a non-JSON body: {reply.body[:200]!r}") from None
        if reply.status != 200:
            message = obj.get("error") if isinstance(obj, dict) else obj
            raise RolloutError(f"rollout server {self.url}{path} refused (HTTP {reply.status}): {message}")
        return obj

    def health(self) -> bool:
        """True when the server answers /health."""
        try:
            reply = self._once("GET", "/health", None, {})
        except (OSError, http.client.HTTPException):
            return False
        return reply.status == 200

    def wait_healthy(self, seconds: float) -> None:
        """Block until /health answers, or raise after `seconds`."""
        deadline = time.monotonic() + seconds
        while not self.health():
            if time.monotonic() > deadline:
                raise RolloutError(f"rollout server {self.url} not healthy after {seconds:.0f}s")
            time.sleep(0.1)

    def info(self) -> dict:
        reply, _ = self._call("GET", "/info")
        return self._json(reply, "/info")

    def reset_prefix_cache(self) -> None:
        reply, _ = self._call("POST", "/reset_prefix_cache", lambda: b"{}", {"Content-Type": "application/json"})
        self._json(reply, "/reset_prefix_cache")

    # -- generate -------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        params: SamplingParams,
        *,
        current_step: int | None = None,
    ) -> RolloutBatch:
        """`params.n` completions per prompt; prompts are strings (clipped) or token-id lists.

        A request the server's limits refuse is sent again as pieces that fit (`split_request`;
        each piece after the first gets its own seed, `piece_seed`), and the groups are joined.
        """
        if not prompts:
            raise ValueError("generate needs at least one prompt")
        if self.server_limits is None:
            try:
                return self._generate_once(prompts, params, current_step)
            except _OverLimits as err:
                self.server_limits = err.limits
                log.info("rollout server %s limits %s: splitting requests to fit", self.url, err.limits)
        # Token counts of text prompts are not known here: their UTF-8 bytes (+ a few special
        # tokens) bound them for byte-level tokenizers.
        lengths = [len(p) if not isinstance(p, str) else len(p[: self.char_limit].encode("utf-8")) + 8 for p in prompts]
        try:
            pieces = split_request(lengths, params.n, params.max_tokens, self.server_limits)
        except ValueError as err:
            raise RolloutError(f"rollout server {self.url}/generate: {err}") from None
        if len(pieces) == 1:
            return self._generate_once(prompts, params, current_step)
        groups: list[list[Sample]] = [[] for _ in prompts]
        totals: dict[str, float] = {}
        versions = []
        for index, (start, end, n) in enumerate(pieces):
            part = self._generate_once(prompts[start:end], dataclasses.replace(params, n=n, seed=piece_seed(params.seed, index)), None)
            for group, extra in zip(groups[start:end], part.groups):
                group.extend(extra)
            for key, value in part.metrics.items():
                totals[key] = totals.get(key, 0.0) + value
            versions.append(part.weight_version)
        version = min(versions)
        metrics = {**totals, "rollout/weight_version": float(version),  # request_pieces: 1 per piece, summed
                   "rollout/partial_prompts": float(sum(0 < len(g) < params.n for g in groups)),
                   "rollout/empty_prompts": float(sum(not g for g in groups))}
        if current_step is not None:
            metrics["rollout/weight_staleness_steps"] = float(current_step - version)
        return RolloutBatch(groups=groups, weight_version=version, metrics=metrics)

    def _generate_once(self, prompts: Sequence, params: SamplingParams, current_step: int | None) -> RolloutBatch:
        """One /generate request; `_OverLimits` when the server refuses it for its size and says its limits."""
        payload, n_clipped = generate_payload(prompts, params, self.client_tag, self.char_limit)
        group_id = hashlib.sha256("|".join(map(str, payload.get("prompts") or payload["prompt_token_ids"])).encode()).hexdigest()
        headers = {"Content-Type": "application/json", CLIENT_TAG_HEADER: self.client_tag, "X-VLLM-Group-Request-ID": group_id}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        start = time.perf_counter()
        raw = json.dumps(payload).encode("utf-8")
        reply, attempts = self._call("POST", "/generate", lambda: raw, headers)
        latency = time.perf_counter() - start
        if reply.status == 413:
            refusal = _json_or_none(reply.body)
            limits = limits_from_json(refusal)
            if limits is not None:
                raise _OverLimits(f"rollout server {self.url}/generate refused (HTTP 413): {refusal.get('error')}", limits)
        body = self._json(reply, "/generate")
        groups, version, dropped = self._parse(body, len(prompts), params)
        metrics = {
            "rollout/latency_s": latency,
            "rollout/attempts": float(attempts),
            "rollout/weight_version": float(version),
            "rollout/foreign_tag_dropped": float(dropped),
            "rollout/completions": float(sum(len(g) for g in groups)),
            "rollout/partial_prompts": float(sum(0 < len(g) < params.n for g in groups)),
            "rollout/empty_prompts": float(sum(not g for g in groups)),
            "rollout/clipped_prompts": float(n_clipped),
            "rollout/request_pieces": 1.0,
        }
        if current_step is not None:
            metrics["rollout/weight_staleness_steps"] = float(current_step - version)
        return RolloutBatch(groups=groups, weight_version=version, metrics=metrics)

    def generate_groups(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        params: SamplingParams,
        *,
        max_rounds: int = 0,
        retry_sleep: float = 0.5,
        current_step: int | None = None,
    ) -> RolloutBatch:
        """`generate`, then re-ask for the completions of groups left short (REFERENCE_SPEC 3.3).

        Up to `max_rounds` requests in all (0 = n); prompts are bucketed by how many they still
        need; a seeded request gets seed + round so a retry does not repeat the same samples.
        Groups still short afterwards are returned short (`rollout/partial_prompts`).
        """
        rounds = max_rounds if max_rounds > 0 else params.n
        batch = self.generate(prompts, params, current_step=current_step)
        groups = [list(g) for g in batch.groups]
        metrics = dict(batch.metrics)
        used = 1
        while used < rounds:
            short: dict[int, list[int]] = {}
            for i, group in enumerate(groups):
                if len(group) < params.n:
                    short.setdefault(params.n - len(group), []).append(i)
            if not short:
                break
            time.sleep(retry_sleep)
            for need, indices in short.items():
                seed = None if params.seed is None else params.seed + used
                extra = self.generate([prompts[i] for i in indices], dataclasses.replace(params, n=need, seed=seed))
                for i, group in zip(indices, extra.groups):
                    groups[i].extend(group)
                metrics["rollout/latency_s"] += extra.metrics["rollout/latency_s"]
                metrics["rollout/foreign_tag_dropped"] += extra.metrics["rollout/foreign_tag_dropped"]
            used += 1
        version = min(s.weight_version for g in groups for s in g)
        metrics.update({
            "rollout/rounds": float(used),
            "rollout/weight_version": float(version),
            "rollout/completions": float(sum(len(g) for g in groups)),
            "rollout/partial_prompts": float(sum(0 < len(g) < params.n for g in groups)),
            "rollout/empty_prompts": float(sum(not g for g in groups)),
        })
        if current_step is not None:
            metrics["rollout/weight_staleness_steps"] = float(current_step - version)
        return RolloutBatch(groups=groups, weight_version=version, metrics=metrics)

    def _parse(self, body: Any, num_prompts: int, params: SamplingParams) -> tuple[list[list[Sample]], int, int]:
        """Our groups, the answer's weight version, how many were dropped; the client_tag policy of Q4."""
        where = f"rollout server {self.url}/generate"
        parsed = parse_results(body, num_prompts, params, self.client_tag, where)
        if parsed.untagged and self.require_tag_echo:
            raise ClientTagError(
                f"{where} returned {parsed.untagged} completion(s) without a client_tag echo: it does not speak the "
                f"client_tag protocol, so completions cannot be told apart from other clients'. Use a maxent-jax "
                f"server, or set require_tag_echo=False to accept untagged results."
            )
        if parsed.dropped:
            self.dropped_foreign += parsed.dropped
            log.warning("dropped %d result(s)/output(s) tagged for another client (ours: %r)", parsed.dropped, self.client_tag)
        if not any(parsed.groups):
            raise ClientTagError(f"{where}: response has no completions for client_tag {self.client_tag!r} ({parsed.dropped} foreign dropped)")
        return parsed.groups, parsed.weight_version, parsed.dropped

    # -- weights --------------------------------------------------------------------------

    def push_params(
        self, params: Any, cfg: Any, *, dtype: str | None = None, version: int | None = None, layout: str | None = None
    ) -> dict[str, Any]:
        """Push live (possibly sharded) decoder parameters: HF names, cast, streamed.

        `params` is the decoder's nnx state or module, `cfg` its ModelConfig; each tensor is
        cast on device (and, in the HF layout, converted) and fetched to the host one at a time
        (`model.hf_io.iter_hf_tensors`). `dtype` defaults to the server's (`/info` dtype),
        `layout` to `native` when the server offers it (`push_layout`), else `hf`.
        """
        from maxent_jax.model.hf_io import iter_hf_tensors  # jax only when pushing from jax params

        if dtype is None or layout is None:
            info = self.info()
            dtype = dtype or info.get("dtype")
            if dtype is None:
                raise RolloutError(f"rollout server {self.url}/info reports no dtype; pass push_params(dtype=...)")
            layout = layout or push_layout(info)
        native = layout == NATIVE_LAYOUT
        return self.push_weights(lambda: iter_hf_tensors(params, cfg, dtype, native=native), version=version, layout=layout)

    def push_adapter(self, tensors: Mapping[str, np.ndarray], spec: AdapterSpec, *, version: int | None = None) -> dict[str, Any]:
        """Push a LoRA policy's adapters alone (PEFT names, float32) onto the base `spec.base` of the server."""
        return self.push_weights(lambda: tensors.items(), version=version, layout=LORA_LAYOUT, adapter=spec)

    def push_weights(
        self,
        tensors: NamedTensors | Callable[[], NamedTensors],
        *,
        version: int | None = None,
        layout: str = HF_LAYOUT,
        adapter: AdapterSpec | None = None,
    ) -> dict[str, Any]:
        """Stream HF-named tensors to POST /weights; returns seconds, bytes, GB/s, the new version, the layout.

        `tensors` is consumed lazily, one tensor at a time. Pass a zero-argument callable
        returning the iterable to allow retries (an iterator can be sent only once). `layout`
        says what shapes they have (protocol.WEIGHT_LAYOUTS); anything but `hf` is sent as the
        `layout` query parameter, which the server checks against its `weight_layouts`.
        """
        if not self.token:
            raise ValueError("push_weights needs the server's token (RolloutClient(token=...))")
        upload = TimedUpload(tensors)
        path, headers = push_request(self.token, version, layout, adapter)
        start = time.perf_counter()
        reply, _ = self._call("POST", path, upload.body, headers, attempts=None if upload.replayable else 1, chunked=True)
        answered_at = time.perf_counter()
        return push_report(self._json(reply, path), layout, upload, start, answered_at)

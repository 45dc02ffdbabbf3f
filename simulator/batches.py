"""Provider batch APIs of the simulator: OpenAI Files + Batches, Anthropic Message Batches.

Everything is kept in memory. A batch runs as an asyncio task through the
real lifecycle, taking about ``batch_processing_s`` in progress (plus
``batch_stage_s`` for validating / finalizing / cancelling), so tests finish
in seconds. Each request is validated and answered exactly as the
synchronous endpoint would (same content, same usage); requests run in a
shuffled order (seeded by the batch id), so output order is not input order.
Batch requests do not use the synchronous rate limits; ``/_stats`` counts
them under ``batch_requests`` per model, and bills them at the batch price
under the provider and the key that created the batch.

Each provider has its own store (its own files and batches, as separate
accounts would): the built-in ones on the default routes and under
``/p/openai/v1`` and ``/p/anthropic``, a named provider under its prefix
(``routes.py``).

OpenAI (``/v1/files``, ``/v1/batches``), endpoints ``/v1/chat/completions``,
``/v1/responses``, ``/v1/embeddings``, ``/v1/completions``, ``/v1/moderations``:
- ``validating``: every line must be JSON with ``custom_id`` (unique),
  ``method`` ``POST``, ``url`` equal to the batch endpoint, a ``body`` object,
  and one model for the whole file, one the Batch API takes (not one of
  ``prices.NO_BATCH``: ``model_not_supported``; an embeddings batch: at most 50,000
  inputs in all: ``batch_rules.validate_openai_lines``); otherwise the batch is ``failed`` with
  ``errors.data[] {code, line, message, param}``.
- ``in_progress`` → ``finalizing`` → ``completed``: successes go to the
  output file, requests the API refuses (status 400/404) to the error file,
  both in the shape ``{"id": "batch_req_…", "custom_id", "response":
  {"status_code", "request_id", "body"}, "error": null}``.
- cancel: ``cancelling`` → ``cancelled``; what was done is in the output and
  error files; requests never run are listed in the error file with
  ``"response": null, "error": {"code": "batch_cancelled", …}`` and are not in
  ``request_counts``.

Anthropic (``/v1/messages/batches``): ``custom_id`` format and uniqueness are
checked at creation (400); params are validated while processing and come
back as ``errored`` results. ``processing_status`` ``in_progress`` →
(``canceling``) → ``ended``; results are JSONL at ``results_url``.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from datetime import datetime, timezone

from aiohttp import web

from simulator import batch_rules
from simulator.batch_rules import sim_time
from simulator.endpoints import MESSAGES, OPENAI_ENDPOINTS, model_of
from simulator.server import ALIAS_KEY
from simulator.protocol import Problem, anthropic_error_body

DAY_S = 24 * 3600
CUSTOM_ID_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
ANTHROPIC_MAX_REQUESTS = 100_000
YIELD_EVERY = 100


def _json(body, status: int = 200, headers: dict | None = None) -> web.Response:
    return web.Response(body=json.dumps(body).encode(), status=status,
                        headers={"Content-Type": "application/json", **(headers or {})})


def _oa_error(status: int, message: str, param: str | None = None, code: str | None = None,
              kind: str = "invalid_request_error") -> web.Response:
    return _json({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


def _an_error(status: int, kind: str, message: str) -> web.Response:
    return _json(anthropic_error_body(kind, message), status)


def _rfc3339(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _page(items: list, key_after: str | None, limit: int) -> tuple[list, bool]:
    """Items after the one with id ``key_after`` (newest-first order), at most ``limit``."""
    start = 0
    if key_after:
        for i, item in enumerate(items):
            if item["id"] == key_after:
                start = i + 1
                break
    chunk = items[start:start + limit]
    return chunk, start + limit < len(items)


def _limit(request: web.Request, default: int, maximum: int) -> int:
    try:
        value = int(request.query.get("limit", default))
    except ValueError:
        raise Problem("limit must be an integer", "limit") from None
    if not 1 <= value <= maximum:
        raise Problem(f"limit must be between 1 and {maximum}", "limit")
    return value


class BatchStore:
    def __init__(self, sim, provider):
        self.sim = sim
        self.provider = provider
        self._alias: dict[str, str] = {}     # batch id -> alias of the key that created it
        self.files: dict[str, dict] = {}
        self.file_content: dict[str, bytes] = {}
        self.openai_batches: dict[str, dict] = {}
        self.anthropic_batches: dict[str, dict] = {}
        self._anthropic_requests: dict[str, list] = {}
        self._anthropic_results: dict[str, list] = {}
        self._tasks: set[asyncio.Task] = set()
        self.queue = batch_rules.Queue()     # OpenAI's enqueued tokens per model

    async def shutdown(self, app=None) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _count(self, model: str) -> None:
        br = self.sim.stats.batch_requests
        br[model] = br.get(model, 0) + 1

    def _pace(self, n: int) -> tuple[int, float]:
        """``(requests per step, pause per step)`` so ``n`` requests take about ``batch_processing_s``."""
        steps = max(1, min(n, 20))
        pause = self.sim.config.batch_processing_s / steps
        per_step = -(-n // steps)
        return per_step, pause

    # ==================================================================== OpenAI files

    def _new_file(self, content: bytes, filename: str, purpose: str, keep_s: int | None = None) -> dict:
        fid = self.sim.new_id("file-")
        now = int(sim_time(self.sim))
        meta = {"id": fid, "object": "file", "bytes": len(content), "created_at": now,
                "filename": filename, "purpose": purpose, "status": "processed",
                "expires_at": now + keep_s if keep_s else None, "status_details": None}
        self.files[fid] = meta
        self.file_content[fid] = content
        return meta

    async def create_file(self, request: web.Request) -> web.Response:
        try:
            form = await request.post()
        except Exception:
            return _oa_error(400, "The request must be multipart/form-data with 'file' and 'purpose'.")
        purpose = form.get("purpose")
        upload = form.get("file")
        if not purpose:
            return _oa_error(400, "Missing required parameter: 'purpose'.", "purpose", "missing_required_parameter")
        if upload is None or not hasattr(upload, "file"):
            return _oa_error(400, "Missing required parameter: 'file'.", "file", "missing_required_parameter")
        content = upload.file.read()
        if purpose == "batch" and not (upload.filename or "").endswith(".jsonl"):
            # OpenAI requires .jsonl for batch input; say so rather than guess
            return _oa_error(400, "Invalid file format for Batch API. Must be .jsonl", "file", "invalid_file_format")
        return _json(self._new_file(content, upload.filename or "upload", str(purpose)))

    async def list_files(self, request: web.Request) -> web.Response:
        purpose = request.query.get("purpose")
        data = [f for f in reversed(self.files.values()) if not purpose or f["purpose"] == purpose]
        return _json({"object": "list", "data": data, "has_more": False,
                      "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None})

    def _file_or_404(self, fid: str):
        meta = self.files.get(fid)
        if meta is not None and meta["expires_at"] is not None and sim_time(self.sim) >= meta["expires_at"]:
            del self.files[fid]   # expired: deleted, as OpenAI does
            self.file_content.pop(fid, None)
            meta = None
        if meta is None:
            return None, _oa_error(404, f"No such File object: {fid}", "id")
        return meta, None

    async def get_file(self, request: web.Request) -> web.Response:
        meta, err = self._file_or_404(request.match_info["id"])
        return err or _json(meta)

    async def delete_file(self, request: web.Request) -> web.Response:
        fid = request.match_info["id"]
        meta, err = self._file_or_404(fid)
        if err:
            return err
        del self.files[fid]
        self.file_content.pop(fid, None)
        return _json({"id": fid, "object": "file", "deleted": True})

    async def get_file_content(self, request: web.Request) -> web.Response:
        meta, err = self._file_or_404(request.match_info["id"])
        if err:
            return err
        return web.Response(body=self.file_content[meta["id"]], content_type="application/octet-stream")

    # ==================================================================== OpenAI batches

    async def create_openai_batch(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return _oa_error(400, "We could not parse the JSON body of your request.")
        if not isinstance(body, dict):
            return _oa_error(400, "The request body must be a JSON object.")
        for name in ("input_file_id", "endpoint", "completion_window"):
            if not body.get(name):
                return _oa_error(400, f"Missing required parameter: '{name}'.", name, "missing_required_parameter")
        if body["endpoint"] not in OPENAI_ENDPOINTS:
            return _oa_error(400, f"Invalid value: '{body['endpoint']}'. The simulator supports "
                                  f"{', '.join(OPENAI_ENDPOINTS)}.", "endpoint", "invalid_value")
        if body["completion_window"] != "24h":
            return _oa_error(400, f"Invalid value: '{body['completion_window']}'. Supported values are: '24h'.",
                             "completion_window", "invalid_value")
        metadata = body.get("metadata")
        if metadata is not None and (not isinstance(metadata, dict) or len(metadata) > 16):
            return _oa_error(400, "Invalid 'metadata': at most 16 key-value pairs.", "metadata", "invalid_value")
        fid = body["input_file_id"]
        if fid not in self.files:
            return _oa_error(404, f"No such File object: {fid}", "input_file_id")
        try:
            keep_s = batch_rules.output_keep_s(body.get("output_expires_after"))
        except ValueError as e:
            return _oa_error(400, f"Invalid 'output_expires_after': {e}.", "output_expires_after", "invalid_value")
        now = int(time.time())
        batch = {
            "id": self.sim.new_id("batch_"), "object": "batch", "endpoint": body["endpoint"],
            "errors": None, "input_file_id": fid, "completion_window": "24h", "status": "validating",
            "output_file_id": None, "error_file_id": None, "created_at": now,
            "in_progress_at": None, "expires_at": now + DAY_S, "finalizing_at": None,
            "completed_at": None, "failed_at": None, "expired_at": None, "cancelling_at": None,
            "cancelled_at": None, "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": metadata, "model": None, "usage": None, "output_keep_s": keep_s,
        }
        self.openai_batches[batch["id"]] = batch
        self._alias[batch["id"]] = request.get(ALIAS_KEY, "no-key")
        self._spawn(self._run_openai(batch))
        return _json(batch)

    def _call(self, endpoint, batch_id: str):
        from simulator.server import Call

        call = Call(self.provider, endpoint)
        call.alias = self._alias.get(batch_id, "no-key")
        return call

    async def _run_openai(self, batch: dict) -> None:
        cfg = self.sim.config
        call = self._call(OPENAI_ENDPOINTS[batch["endpoint"]], batch["id"])
        await asyncio.sleep(cfg.batch_stage_s)
        if batch["status"] == "cancelling":
            await self._finish_openai_cancel(batch, [], [], [])
            return
        items, errors, model = batch_rules.validate_openai_lines(self.file_content[batch["input_file_id"]], batch["endpoint"])
        batch["model"] = model
        limit = cfg.batch_enqueued_tokens.get(model) if model else None
        tokens = batch_rules.prompt_tokens(self.sim, call, items) if limit is not None and not errors else 0
        refused = None if errors else self.queue.admit(model, tokens, limit)
        if refused:
            errors = [{"code": "token_limit_exceeded", "line": None, "message": refused, "param": None}]
        if errors:
            batch.update(status="failed", failed_at=int(time.time()),
                         errors={"object": "list", "data": errors})
            return
        try:
            await self._run_openai_lines(batch, call, items)
        finally:
            self.queue.release(model, tokens)

    async def _run_openai_lines(self, batch: dict, call, items: list) -> None:
        cfg = self.sim.config
        counts = batch["request_counts"]
        counts["total"] = len(items)
        batch.update(status="in_progress", in_progress_at=int(time.time()))
        order = list(range(len(items)))
        random.Random(f"{cfg.seed}:{batch['id']}").shuffle(order)
        if len(order) > 1 and order == sorted(order):
            order.reverse()  # never the input order
        out_lines, err_lines = [], []
        usage = [0, 0, 0]
        per_step, pause = self._pace(len(order))
        expire_at = batch_rules.expire_from(len(order), cfg.batch_expire_share)
        done = 0
        for pos, idx in enumerate(order):
            if batch["status"] == "cancelling" or pos >= expire_at:
                break
            cid, body = items[idx]
            rid = self.sim.new_id("req_")
            line = {"id": self.sim.new_id("batch_req_"), "custom_id": cid, "response": None, "error": None}
            try:
                answer = self.sim.evaluate(call, body)
            except Problem as p:
                line["response"] = {"status_code": p.status, "request_id": rid,
                                    "body": {"error": {"message": p.message, "type": p.kind,
                                                       "param": p.param, "code": p.code}}}
                err_lines.append(line)
                counts["failed"] += 1
            else:
                model = model_of(call.endpoint, body)
                billed = self.sim.charge(call, answer, model, "batch", None, batch=True, batch_line=cid)
                reply = call.endpoint.reply(answer, billed, model, self.sim.new_id, "batch")
                line["response"] = {"status_code": 200, "request_id": rid, "body": reply}
                out_lines.append(json.dumps(line))   # as text at once: a dict of 1,536 floats weighs 40 KB
                counts["completed"] += 1
                usage[0] += billed.get("prompt_tokens", billed.get("input_tokens", 0))
                usage[1] += billed.get("completion_tokens", billed.get("output_tokens", 0))
                usage[2] += (billed.get("prompt_tokens_details") or billed.get("input_tokens_details")
                             or {}).get("cached_tokens", 0)
                self._count(model)
            done = pos + 1
            if done % per_step == 0:
                await asyncio.sleep(pause)
            elif done % YIELD_EVERY == 0:
                await asyncio.sleep(0)
        batch["usage"] = {"input_tokens": usage[0], "input_tokens_details": {"cached_tokens": usage[2]},
                          "output_tokens": usage[1], "output_tokens_details": {"reasoning_tokens": 0},
                          "total_tokens": usage[0] + usage[1]}
        if batch["status"] == "cancelling":
            never = [items[i][0] for i in order[done:]]
            await self._finish_openai_cancel(batch, out_lines, err_lines, never)
            return
        if done < len(order):   # the window ran out (batch_expire_share): the rest expire, unbilled
            err_lines += [{"id": self.sim.new_id("batch_req_"), "custom_id": items[i][0], "response": None,
                           "error": {"code": "batch_expired", "message": "This request could not be executed"
                                     " before the completion window expired."}} for i in order[done:]]
            self._write_outputs(batch, out_lines, err_lines)
            batch.update(status="expired", expired_at=int(time.time()))
            return
        batch.update(status="finalizing", finalizing_at=int(time.time()))
        await asyncio.sleep(cfg.batch_stage_s)
        self._write_outputs(batch, out_lines, err_lines)
        batch.update(status="completed", completed_at=int(time.time()))

    def _write_outputs(self, batch: dict, out_lines: list, err_lines: list) -> None:
        def blob(lines):
            return "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines).encode()

        keep_s = batch.get("output_keep_s")
        if out_lines:
            batch["output_file_id"] = self._new_file(
                blob(out_lines), f"batch_{batch['id']}_output.jsonl", "batch_output", keep_s)["id"]
        if err_lines:
            batch["error_file_id"] = self._new_file(
                blob(err_lines), f"batch_{batch['id']}_error.jsonl", "batch_output", keep_s)["id"]

    async def _finish_openai_cancel(self, batch, out_lines, err_lines, never: list) -> None:
        await asyncio.sleep(self.sim.config.batch_stage_s)
        err_lines = err_lines + [
            {"id": self.sim.new_id("batch_req_"), "custom_id": cid, "response": None,
             "error": {"code": "batch_cancelled", "message": "The batch was cancelled before this request ran."}}
            for cid in never]
        self._write_outputs(batch, out_lines, err_lines)
        batch.update(status="cancelled", cancelled_at=int(time.time()))

    def _openai_batch_or_404(self, bid: str):
        batch = self.openai_batches.get(bid)
        if batch is None:
            return None, _oa_error(404, f"No batch found with id '{bid}'.", "batch_id")
        return batch, None

    async def get_openai_batch(self, request: web.Request) -> web.Response:
        batch, err = self._openai_batch_or_404(request.match_info["id"])
        return err or _json(batch)

    async def list_openai_batches(self, request: web.Request) -> web.Response:
        try:
            limit = _limit(request, 20, 100)
        except Problem as p:
            return _oa_error(400, p.message, p.param, "invalid_value")
        items = list(reversed(self.openai_batches.values()))
        data, more = _page(items, request.query.get("after"), limit)
        return _json({"object": "list", "data": data, "has_more": more,
                      "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None})

    async def cancel_openai_batch(self, request: web.Request) -> web.Response:
        batch, err = self._openai_batch_or_404(request.match_info["id"])
        if err:
            return err
        if batch["status"] in ("validating", "in_progress"):
            batch.update(status="cancelling", cancelling_at=int(time.time()))
        elif batch["status"] not in ("cancelling", "cancelled"):
            return _oa_error(400, f"Cannot cancel a batch with status '{batch['status']}'.", None, "invalid_state")
        return _json(batch)

    # ==================================================================== Anthropic batches

    def _an_view(self, batch: dict, request: web.Request) -> dict:
        view = {
            "id": batch["id"], "type": "message_batch", "processing_status": batch["processing_status"],
            "request_counts": dict(batch["request_counts"]),
            "ended_at": _rfc3339(batch["ended_at"]), "created_at": _rfc3339(batch["created_at"]),
            "expires_at": _rfc3339(batch["created_at"] + DAY_S), "archived_at": None,
            "cancel_initiated_at": _rfc3339(batch["cancel_initiated_at"]), "results_url": None,
        }
        if batch["processing_status"] == "ended":
            prefix = request.path.split("/v1/messages/batches")[0]
            view["results_url"] = f"{request.url.origin()}{prefix}/v1/messages/batches/{batch['id']}/results"
        return view

    async def create_anthropic_batch(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return _an_error(400, "invalid_request_error", "The request body is not valid JSON.")
        reqs = body.get("requests") if isinstance(body, dict) else None
        if not isinstance(reqs, list) or not reqs:
            return _an_error(400, "invalid_request_error", "requests: a non-empty list is required")
        if len(reqs) > ANTHROPIC_MAX_REQUESTS:
            return _an_error(400, "invalid_request_error",
                             f"requests: at most {ANTHROPIC_MAX_REQUESTS} requests per batch")
        seen = set()
        for i, r in enumerate(reqs):
            cid = r.get("custom_id") if isinstance(r, dict) else None
            if not isinstance(cid, str) or not CUSTOM_ID_RE.match(cid):
                return _an_error(400, "invalid_request_error",
                                 f"requests.{i}.custom_id: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'")
            if cid in seen:
                return _an_error(400, "invalid_request_error",
                                 f"requests.{i}.custom_id: duplicate custom_id '{cid}'")
            seen.add(cid)
            if not isinstance(r.get("params"), dict):
                return _an_error(400, "invalid_request_error", f"requests.{i}.params: Field required")
        batch = {"id": self.sim.new_id("msgbatch_"), "processing_status": "in_progress",
                 "request_counts": {"processing": len(reqs), "succeeded": 0, "errored": 0,
                                    "canceled": 0, "expired": 0},
                 "created_at": sim_time(self.sim), "ended_at": None, "cancel_initiated_at": None}
        self.anthropic_batches[batch["id"]] = batch
        self._anthropic_requests[batch["id"]] = [(r["custom_id"], r["params"]) for r in reqs]
        self._anthropic_results[batch["id"]] = []
        self._alias[batch["id"]] = request.get(ALIAS_KEY, "no-key")
        self._spawn(self._run_anthropic(batch))
        return _json(self._an_view(batch, request))

    async def _run_anthropic(self, batch: dict) -> None:
        cfg = self.sim.config
        call = self._call(MESSAGES, batch["id"])
        items = self._anthropic_requests[batch["id"]]
        results = self._anthropic_results[batch["id"]]
        counts = batch["request_counts"]
        order = list(range(len(items)))
        random.Random(f"{cfg.seed}:{batch['id']}").shuffle(order)
        if len(order) > 1 and order == sorted(order):
            order.reverse()
        per_step, pause = self._pace(len(order))
        expire_at = batch_rules.expire_from(len(order), cfg.batch_expire_share)
        done = 0
        for pos, idx in enumerate(order):
            if batch["processing_status"] == "canceling" or pos >= expire_at:
                break
            cid, params = items[idx]
            try:
                answer = self.sim.evaluate(call, params)
            except Problem as p:
                kind = "not_found_error" if p.status == 404 else p.kind
                results.append({"custom_id": cid, "result": {
                    "type": "errored", "error": anthropic_error_body(kind, p.message)}})
                counts["errored"] += 1
            else:
                billed = self.sim.charge(call, answer, params["model"], "batch", None, batch=True, batch_line=cid)
                results.append({"custom_id": cid, "result": {
                    "type": "succeeded", "message": MESSAGES.reply(answer, billed, params["model"],
                                                                   self.sim.new_id, "batch")}})
                counts["succeeded"] += 1
                self._count(params["model"])
            counts["processing"] -= 1
            done = pos + 1
            if done % per_step == 0:
                await asyncio.sleep(pause)
            elif done % YIELD_EVERY == 0:
                await asyncio.sleep(0)
        if batch["processing_status"] == "canceling":
            await asyncio.sleep(cfg.batch_stage_s)
            for idx in order[done:]:
                results.append({"custom_id": items[idx][0], "result": {"type": "canceled"}})
                counts["canceled"] += 1
                counts["processing"] -= 1
        else:
            for idx in order[done:]:   # the window ran out (batch_expire_share): expired, unbilled
                results.append({"custom_id": items[idx][0], "result": {"type": "expired"}})
                counts["expired"] += 1
                counts["processing"] -= 1
        batch.update(processing_status="ended", ended_at=sim_time(self.sim))

    def _an_batch_or_404(self, bid: str):
        batch = self.anthropic_batches.get(bid)
        if batch is None:
            return None, _an_error(404, "not_found_error", f"No message batch found with id '{bid}'.")
        return batch, None

    async def get_anthropic_batch(self, request: web.Request) -> web.Response:
        batch, err = self._an_batch_or_404(request.match_info["id"])
        return err or _json(self._an_view(batch, request))

    async def list_anthropic_batches(self, request: web.Request) -> web.Response:
        try:
            limit = _limit(request, 20, 1000)
        except Problem as p:
            return _an_error(400, "invalid_request_error", p.message)
        items = [self._an_view(b, request) for b in reversed(self.anthropic_batches.values())]
        before = request.query.get("before_id")
        if before:
            idx = next((i for i, b in enumerate(items) if b["id"] == before), 0)
            data = items[max(0, idx - limit):idx]
            more = idx - limit > 0
        else:
            data, more = _page(items, request.query.get("after_id"), limit)
        return _json({"data": data, "has_more": more,
                      "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None})

    async def cancel_anthropic_batch(self, request: web.Request) -> web.Response:
        batch, err = self._an_batch_or_404(request.match_info["id"])
        if err:
            return err
        if batch["processing_status"] == "in_progress":
            batch.update(processing_status="canceling", cancel_initiated_at=time.time())
        return _json(self._an_view(batch, request))

    async def delete_anthropic_batch(self, request: web.Request) -> web.Response:
        bid = request.match_info["id"]
        batch, err = self._an_batch_or_404(bid)
        if err:
            return err
        if batch["processing_status"] != "ended":
            return _an_error(400, "invalid_request_error", "A batch must have ended before it can be deleted.")
        del self.anthropic_batches[bid]
        self._anthropic_requests.pop(bid, None)
        self._anthropic_results.pop(bid, None)
        return _json({"id": bid, "type": "message_batch_deleted"})

    async def anthropic_results(self, request: web.Request) -> web.Response:
        batch, err = self._an_batch_or_404(request.match_info["id"])
        if err:
            return err
        if batch["processing_status"] != "ended":
            return _an_error(400, "invalid_request_error",
                             f"Batch {batch['id']} has not ended; results are not available yet.")
        if sim_time(self.sim) >= batch["created_at"] + batch_rules.ANTHROPIC_RESULTS_KEEP_S:
            return _an_error(404, "not_found_error", f"The results of message batch {batch['id']} are no longer"
                                                     " available: they are kept 29 days after its creation.")
        blob = "".join(json.dumps(r) + "\n" for r in self._anthropic_results[batch["id"]])
        return web.Response(body=blob.encode(), content_type="application/binary")

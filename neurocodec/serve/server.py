"""The grpc.aio server: `neurocodec.v1.Codec` servicer, bearer-token auth, health, reflection, TLS,
admission control, idle/maximum-duration limits, graceful drain on SIGTERM, JSON-lines logs.

Threads: the event loop handles every RPC (parsing, validation, resampling, queues); each model has one
worker thread (batcher.Worker) that runs the streaming steps; unary Encode/Decode run on a separate
offline copy of the model in a thread, so they never touch the sessions' streaming state.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import gc
import json
import logging
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import grpc
import numpy as np
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from ..audio import resample
from ..errors import UserError
from .batcher import END, Worker
from .v1 import codec_pb2 as pb
from .v1 import codec_pb2_grpc as pb_grpc
from .session import DecodeSession, EncodeSession, StreamSession
from .wire import (ServeError, audio_to_bytes, bytes_to_audio, check_channels, check_code_range, check_format,
                   check_rate, invalid)

SERVICE = pb.DESCRIPTOR.services_by_name["Codec"].full_name  # "neurocodec.v1.Codec"
log = logging.getLogger("neurocodec.serve")
_HAS_TIMEOUT_CONTEXT = hasattr(asyncio, "timeout")  # Python 3.11+
# How long the event loop may hold the GIL while the model worker waits for it (Python's default: 5 ms). The worker
# takes the GIL back after each step; waiting up to 5 ms for it each time is a quarter of a 20 ms frame. The setting is
# process-wide: a server embedded in another program (ServerThread) changes it for that program too.
SWITCH_INTERVAL_S = 0.0005


# -- logging --------------------------------------------------------------------------------------------
class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3), "level": record.levelname.lower(), "event": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        return json.dumps(entry)


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False


def event(name: str, level: int = logging.INFO, **fields) -> None:
    log.log(level, name, extra={"fields": fields})


# -- options --------------------------------------------------------------------------------------------
@dataclass
class ServerOptions:
    models: list[str] = field(default_factory=lambda: ["grvq_4cb"])
    host: str = "127.0.0.1"
    port: int = 50051  # 0 = any free port (see Server.port)
    max_streams: int = 64  # session slots per model and direction
    batching: bool = True  # False: step sessions one by one (for benchmarks)
    traced_steps: bool = True  # batched steps as TorchScript graphs (codecs/traced_steps.py); False: eager
    auth_token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    max_message_bytes: int = 4 << 20
    idle_timeout_s: float = 30.0  # no message from the client for this long ends the session
    max_session_s: float = 3600.0
    max_buffered_s: float = 2.0  # audio not yet encoded per session; beyond it the server stops reading (backpressure)
    max_outstanding: int = 250  # results queued per session (5 s of frames) before its steps pause
    grace_s: float = 30.0  # graceful drain on SIGTERM
    # torch intra-op threads, process-wide (None: leave torch's setting). `neurocodec serve` sets 1: a served step is
    # many small kernels, and with more threads OpenMP's workers spin between them on the cores that the event loop
    # needs (default model, 48 streams on 2 cores: p99 46 ms with torch's default of 2 threads, 15 ms with 1).
    torch_threads: int | None = None
    exact_encoding: bool = True  # float64 encoder: streamed tokens equal offline `encode` (see codecs/model.py)


@dataclass
class ServedModel:
    name: str
    codec: torch.nn.Module  # streaming instance, owned by the worker thread
    offline: torch.nn.Module  # copy for unary calls
    worker: Worker
    offline_lock: threading.Lock = field(default_factory=threading.Lock)

    def info(self) -> pb.ModelInfo:
        c = self.offline
        cards = c.quantizer.cardinalities[: c.total_codebooks]
        return pb.ModelInfo(
            name=self.name, family=c.config.family, sample_rate_hz=c.sample_rate, frame_rate=c.frame_rate,
            frame_size=c.frame_size, num_codebooks=c.total_codebooks, allowed_num_codebooks=c.allowed_num_codebooks(),
            cardinalities=cards, bitrate_bps=sum(math.log2(x) for x in cards) * c.frame_rate,
            algorithmic_latency_ms=1000.0 * c.algorithmic_latency, max_streams=self.worker.max_streams,
            free_encode_slots=self.worker.free_slots("encode"), free_decode_slots=self.worker.free_slots("decode"))


# -- auth -----------------------------------------------------------------------------------------------
class BearerAuth(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on every Codec call (health and reflection stay open, so
    that load balancers and grpcurl can probe the server)."""

    def __init__(self, token: str) -> None:
        self.expected = f"Bearer {token}"

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if not details.method.startswith(f"/{SERVICE}/") or handler is None:
            return handler
        got = dict(details.invocation_metadata or ()).get("authorization")
        if got == self.expected:
            return handler
        message = "missing bearer token (metadata 'authorization: Bearer <token>')" if got is None else "wrong bearer token"
        event("auth_rejected", logging.WARNING, method=details.method, reason=message)

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            return None

        async def deny_stream(request_iterator, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            yield  # pragma: no cover  (makes this an async generator, as streaming handlers are)

        kinds = {(False, False): grpc.unary_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
        make = kinds[(handler.request_streaming, handler.response_streaming)]
        fn = deny_stream if handler.response_streaming else deny
        return make(fn, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)


# -- the servicer ------------------------------------------------------------------------------------------
class CodecServicer(pb_grpc.CodecServicer):
    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.models: dict[str, ServedModel] = {}
        self.default_model: str | None = None
        self.ready = False
        self.draining = False
        self.active = 0
        self._session_ids = 0

    # -- helpers ------------------------------------------------------------------------------------------
    def _model(self, name: str) -> ServedModel:
        if not self.ready:
            raise ServeError(grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry when health reports SERVING")
        name = name or self.default_model
        if name not in self.models:
            raise invalid(f"unknown model {name!r}; this server has: {', '.join(self.models)}")
        failed = self.failed_worker()
        if failed is not None:  # one dead worker takes the replica out of service (health says NOT_SERVING)
            raise ServeError(grpc.StatusCode.UNAVAILABLE, failed)
        return self.models[name]

    def failed_worker(self) -> str | None:
        """Why this server serves nothing any more (a model's worker thread died), or None."""
        for model in self.models.values():
            message = model.worker.failure_message()
            if message is not None:
                return f"{model.name}: {message}"
        return None

    @staticmethod
    def _num_codebooks(model: ServedModel, k: int) -> int:
        allowed = model.offline.allowed_num_codebooks()
        k = k or model.offline.total_codebooks
        if k not in allowed:
            raise invalid(f"num_codebooks={k} is not allowed for {model.name}: use one of {allowed}")
        return k

    def _admit(self) -> None:
        if self.draining:
            raise ServeError(grpc.StatusCode.UNAVAILABLE, "server is shutting down; reconnect to another replica")

    async def _next(self, it, session_start: float):
        """Next client message, or None at half-close; enforces the idle and maximum-duration limits."""
        o = self.options
        left = session_start + o.max_session_s - time.monotonic()
        timeout = min(o.idle_timeout_s, left)
        try:
            if _HAS_TIMEOUT_CONTEXT:  # no task per message, as wait_for makes before Python 3.12
                async with asyncio.timeout(max(timeout, 0.0)):
                    return await it.__anext__()
            return await asyncio.wait_for(it.__anext__(), timeout=max(timeout, 0.0))
        except StopAsyncIteration:
            return None
        except asyncio.TimeoutError:
            if left <= o.idle_timeout_s:
                raise ServeError(grpc.StatusCode.OUT_OF_RANGE,
                                 f"session exceeded the maximum duration of {o.max_session_s:g} s") from None
            raise ServeError(grpc.StatusCode.OUT_OF_RANGE,
                             f"no message for {o.idle_timeout_s:g} s (idle timeout); send audio close to real time") from None

    async def _first(self, it, want: str, start: float):
        msg = await self._next(it, start)
        if msg is None:
            raise ServeError(grpc.StatusCode.FAILED_PRECONDITION, "stream closed before its config message")
        got = msg.WhichOneof("request")
        if got != "config":
            raise ServeError(grpc.StatusCode.FAILED_PRECONDITION,
                             f"the first message of a {want} stream must be its config, got {got or 'an empty message'}")
        return msg.config

    def _label(self, session_id: str) -> str:
        self._session_ids += 1
        return session_id or f"s{self._session_ids}"

    async def _pump(self, worker: Worker, session, reader: asyncio.Task, limit: int = 64):
        """Yield lists of (index, output) from a session's queue until END; raise the reader's or worker's error."""
        while True:
            item = await session.queue.get()
            items = [item]
            while not session.queue.empty() and len(items) < limit and items[-1] is not END:
                items.append(session.queue.get_nowait())
            for it in items:
                if isinstance(it, BaseException):
                    raise it
            data = [it for it in items if it is not END]
            if data:
                worker.taken(session, len(data))
                yield data
            if items[-1] is END:
                return

    async def _run_session(self, context, kind: str, label: str, model: ServedModel, body):
        """Common wrapper: logs, error -> status, slot release."""
        start = time.monotonic()
        self.active += 1
        event("session_start", kind=kind, session=label, model=model.name, peer=context.peer())
        status = "OK"
        try:
            async for response in body:
                yield response
        except ServeError as err:
            status = err.code.name
            event("session_error", logging.WARNING, kind=kind, session=label, code=status, message=err.message)
            await context.abort(err.code, err.message)
            return
        except asyncio.CancelledError:
            status = "CANCELLED"
            raise
        finally:
            self.active -= 1
            event("session_end", kind=kind, session=label, status=status, seconds=round(time.monotonic() - start, 3))

    # -- streaming calls: StreamEncode and StreamDecode share all but what serve/session.py says ----------------
    async def StreamEncode(self, request_iterator, context):
        # aclosing: when the call ends early, the session's cleanup runs now, not when the generator is collected
        async with contextlib.aclosing(self._stream_call(EncodeSession, request_iterator, context)) as responses:
            async for response in responses:
                yield response

    async def StreamDecode(self, request_iterator, context):
        async with contextlib.aclosing(self._stream_call(DecodeSession, request_iterator, context)) as responses:
            async for response in responses:
                yield response

    async def _open_stream(self, session_class: type[StreamSession], it, context, start: float) -> StreamSession | None:
        """Admit a streaming call and take a slot. The session checks its own config fields when it is made, so a
        bad config aborts the call before a slot is taken. Returns the session holding its slot (the caller must
        close it), or None when the call was refused."""
        try:
            self._admit()
            cfg = await self._first(it, f"Stream{session_class.kind.capitalize()}", start)
            model = self._model(cfg.model)
            call = session_class(cfg, model, self.options.max_buffered_s)
            k = self._num_codebooks(model, cfg.num_codebooks)
            call.slot = model.worker.open(call.kind, k, asyncio.get_running_loop())
        except ServeError as err:
            event("session_rejected", logging.WARNING, kind=session_class.kind, code=err.code.name, message=err.message)
            await context.abort(err.code, err.message)  # raises: the call ends here
            return None
        return call

    async def _read_client(self, it, start: float, call: StreamSession) -> None:
        """A session's reader task: each client message -> `call.to_input(msg)` -> the worker, with backpressure,
        then `call.flush()`'s tail and END. Errors go to the session's queue: they end this session and no other."""
        worker, slot = call.model.worker, call.slot
        try:
            while (msg := await self._next(it, start)) is not None:
                if msg.WhichOneof("request") != call.carries:
                    raise invalid(f"config may only be sent once, as the first message; later messages carry {call.carries}")
                data = call.to_input(msg)
                if data is not None:
                    worker.push(slot, data)
                while worker.buffered(slot) > call.max_buffered:  # backpressure: stop reading this client
                    await asyncio.sleep(0.005)
            tail = call.flush()
            if tail is not None:
                worker.push(slot, tail)
            worker.end(slot)
        except ServeError as err:
            slot.queue.put_nowait(err)
        except (asyncio.CancelledError, grpc.RpcError):
            raise
        except Exception as err:  # noqa: BLE001 - a bug must end this session only
            slot.queue.put_nowait(ServeError(grpc.StatusCode.INTERNAL, f"internal error: {err!r}"))

    async def _stream_call(self, session_class: type[StreamSession], request_iterator, context):
        """A whole streaming call: admit it, tell the client, start its reader, yield the session's responses;
        whatever happens, stop the reader and free the slot."""
        start = time.monotonic()
        it = request_iterator.__aiter__()
        call = await self._open_stream(session_class, it, context, start)
        if call is None:
            return
        worker, reader = call.model.worker, None
        try:  # the slot is taken: from here on it is freed in `finally`, whatever happens
            label = self._label(call.cfg.session_id)
            # Initial metadata tells the client its session was admitted: clients may wait for it before
            # sending audio (see client._bidi), so a rejection is never reported as a failed write.
            await context.send_initial_metadata((("x-neurocodec-session", label),))
            reader = asyncio.create_task(self._read_client(it, start, call))
            body = call.responses(self._pump(worker, call.slot, reader))
            responses = self._run_session(context, call.kind, label, call.model, body)
            async with contextlib.aclosing(responses):
                async for response in responses:
                    yield response
        finally:
            if reader is not None:
                reader.cancel()
            worker.close(call.slot)

    # -- unary ------------------------------------------------------------------------------------------------
    async def Encode(self, request, context):
        try:
            self._admit()
            cfg = request.config
            model = self._model(cfg.model)
            check_rate(cfg.sample_rate_hz)
            fmt = check_format(cfg.format)
            k = self._num_codebooks(model, cfg.num_codebooks)
            samples = bytes_to_audio(request.audio, fmt, check_channels(cfg.channels))
        except ServeError as err:
            await context.abort(err.code, err.message)
            return None
        codec = model.offline

        def run():
            wav = torch.from_numpy(samples).view(1, 1, -1)
            if cfg.sample_rate_hz != codec.sample_rate:
                wav = resample(wav, cfg.sample_rate_hz, codec.sample_rate)
            with model.offline_lock, torch.no_grad():
                return codec.encode(wav)[0, :k].numpy()

        codes = await asyncio.to_thread(run)
        return pb.EncodeResponse(num_codebooks=codes.shape[0], num_frames=codes.shape[1],
                                 codes=codes.reshape(-1).tolist(), frame_rate=codec.frame_rate)

    async def Decode(self, request, context):
        try:
            self._admit()
            cfg = request.config
            model = self._model(cfg.model)
            out_rate = cfg.sample_rate_hz or model.offline.sample_rate
            check_rate(out_rate)
            fmt = check_format(cfg.format, allow_unspecified=True)
            k = self._num_codebooks(model, cfg.num_codebooks)
            if len(request.codes) != k * request.num_frames:
                raise invalid(f"got {len(request.codes)} codes; expected num_codebooks x num_frames = "
                              f"{k} x {request.num_frames}")
            codes = np.asarray(request.codes, dtype=np.int64).reshape(k, request.num_frames)
            check_code_range(codes, model.offline.quantizer.cardinalities)
        except ServeError as err:
            await context.abort(err.code, err.message)
            return None
        codec = model.offline

        def run():
            with model.offline_lock, torch.no_grad():
                wav = codec.decode(torch.from_numpy(codes).unsqueeze(0))
            if out_rate != codec.sample_rate:
                wav = resample(wav, codec.sample_rate, out_rate)
            return wav.reshape(-1).numpy()

        audio = await asyncio.to_thread(run)
        return pb.DecodeResponse(audio=audio_to_bytes(audio, fmt), sample_rate_hz=out_rate, format=fmt)

    async def ListModels(self, request, context):
        if not self.ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
            return None
        return pb.ListModelsResponse(models=[m.info() for m in self.models.values()], default_model=self.default_model)

    async def GetModelInfo(self, request, context):
        try:
            model = self._model(request.model)
        except ServeError as err:
            await context.abort(err.code, err.message)
            return None
        return model.info()


# -- the server ---------------------------------------------------------------------------------------------
def load_models(options: ServerOptions, preloaded: dict | None = None) -> dict[str, ServedModel]:
    """Load (or take the preloaded codecs), start each model's worker (warm-up included)."""
    from ..codecs.checkpoint import load_codec

    served = {}
    for name in options.models:
        codec = (preloaded or {}).get(name)
        codec = copy.deepcopy(codec) if codec is not None else load_codec(name)
        if codec.info().get("modality", "audio") != "audio":
            raise UserError(f"model {name!r} is an {codec.info()['modality']} codec; the service streams audio codecs only")
        codec.eval()
        codec.set_exact_encoding(options.exact_encoding)
        offline = copy.deepcopy(codec)
        worker = Worker(codec, options.max_streams, batching=options.batching, max_outstanding=options.max_outstanding,
                        traced_steps=options.traced_steps)
        worker.start()
        served[name] = ServedModel(name=name, codec=codec, offline=offline, worker=worker)
        event("model_ready", model=name, max_streams=options.max_streams, batching=options.batching,
              **{k: v for k, v in codec.info().items() if k in ("sample_rate", "frame_rate", "num_codebooks", "parameters")})
    return served


class Server:
    """A running service. `await start()`, then `await wait()`; `await drain()` stops it gracefully."""

    def __init__(self, options: ServerOptions, preloaded: dict | None = None) -> None:
        self.options = options
        self.preloaded = preloaded
        self.servicer = CodecServicer(options)
        self.health = health_aio.HealthServicer()
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._stopped = asyncio.Event()

    async def start(self, load: bool = True) -> int:
        o = self.options
        if o.torch_threads:
            torch.set_num_threads(o.torch_threads)
        interceptors = [BearerAuth(o.auth_token)] if o.auth_token else []
        self._server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_receive_message_length", o.max_message_bytes),
            ("grpc.max_send_message_length", max(o.max_message_bytes, 16 << 20)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5000),
        ])
        pb_grpc.add_CodecServicer_to_server(self.servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection((SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                             reflection.SERVICE_NAME), self._server)
        for name in ("", SERVICE):  # NOT_SERVING until the model is loaded and warmed up
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{o.host}:{o.port}"
        if o.tls_cert or o.tls_key:
            if not (o.tls_cert and o.tls_key):
                raise ValueError("TLS needs both --tls-cert and --tls-key")
            with open(o.tls_key, "rb") as k, open(o.tls_cert, "rb") as c:
                creds = grpc.ssl_server_credentials([(k.read(), c.read())])
            self.port = self._server.add_secure_port(address, creds)
        else:
            self.port = self._server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        await self._server.start()
        event("listening", address=f"{o.host}:{self.port}", tls=bool(o.tls_cert), auth=bool(o.auth_token))
        if load:
            try:
                await self.load()
            except BaseException:  # e.g. an unknown model: stop listening before the error reaches the user
                await self._server.stop(0)
                raise
        return self.port

    async def load(self) -> None:
        self.servicer.models = await asyncio.to_thread(load_models, self.options, self.preloaded)
        self.servicer.default_model = self.options.models[0]
        loop = asyncio.get_running_loop()
        for model in self.servicer.models.values():
            model.worker.on_failure = functools.partial(self._worker_failed_threadsafe, loop, model.name)
        # The objects that exist now (torch, the models, grpc) live as long as the server: move them out of the
        # garbage collector's view, so that a full collection while serving walks only what serving allocates
        # (with them it takes ~120 ms, one stall of every session).
        gc.freeze()
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self.servicer.ready = True
        for name in ("", SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        event("serving", models=list(self.servicer.models))
        for model in self.servicer.models.values():  # a worker that died before its callback was set
            if model.worker.error is not None:
                await self._worker_failed(model.name, model.worker.error)

    def _worker_failed_threadsafe(self, loop: asyncio.AbstractEventLoop, name: str, err: BaseException) -> None:
        """Worker.on_failure (runs on the dead worker's thread): hand over to the event loop."""
        asyncio.run_coroutine_threadsafe(self._worker_failed(name, err), loop)

    async def _worker_failed(self, name: str, err: BaseException) -> None:
        """A model's worker died: its sessions have been told (INTERNAL); new ones get UNAVAILABLE
        (`CodecServicer._model`), and health turns NOT_SERVING so that load balancers route elsewhere."""
        event("worker_failed", logging.ERROR, model=name, error=f"{type(err).__name__}: {err}")
        for service in ("", SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def drain(self, grace: float | None = None) -> None:
        """Graceful stop: NOT_SERVING, refuse new sessions, let running ones finish (up to `grace` s)."""
        grace = self.options.grace_s if grace is None else grace
        event("draining", active_sessions=self.servicer.active, grace_s=grace)
        self.servicer.draining = True
        await self.health.enter_graceful_shutdown()
        deadline = time.monotonic() + grace
        while self.servicer.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self._server.stop(max(0.0, deadline - time.monotonic()))
        for model in self.servicer.models.values():
            model.worker.stop()
        event("stopped")
        self._stopped.set()

    async def wait(self) -> None:
        await self._stopped.wait()


async def serve_forever(options: ServerOptions) -> None:
    """`neurocodec serve`: run until SIGTERM/SIGINT, then drain."""
    server = Server(options)
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task] = []

    def on_signal(sig):
        if not stopping:
            event("signal", signal=signal.Signals(sig).name)
            stopping.append(loop.create_task(server.drain()))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    await server.start()
    await server.wait()


class ServerThread:
    """A server on its own event loop in a background thread (tests, benchmarks, embedding)."""

    def __init__(self, options: ServerOptions, preloaded: dict | None = None) -> None:
        self.options = options
        self.preloaded = preloaded
        self.loop = asyncio.new_event_loop()
        self.server: Server | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, name="neurocodec-server", daemon=True)

    def start(self, load: bool = True) -> int:
        """Listen (and, with `load`, load the models and report SERVING); returns the port."""
        self._thread.start()
        self.server = Server(self.options, self.preloaded)
        return asyncio.run_coroutine_threadsafe(self.server.start(load=load), self.loop).result()

    @property
    def port(self) -> int:
        return self.server.port

    def call(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float = 1.0) -> None:
        if self.server is not None and not self.server._stopped.is_set():
            self.call(self.server.drain(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)

"""Python client library for the neurocodec service: `CodecClient` (blocking) and `AsyncCodecClient` (asyncio).

    from neurocodec.serve.client import CodecClient
    with CodecClient("127.0.0.1:50051") as client:
        for frame in client.stream_encode(chunks, sample_rate=16000):   # chunks: iterable of float32 arrays
            print(frame.index, list(frame.tokens))
        audio = client.decode(codes)                                     # codes: int [K, T]

Audio is sent as numpy float32 (mono [N] or interleaved [N, C]) and converted to the wire format here.
Failures raise `ServiceError` (a UserError: the CLI prints it on one line) carrying the gRPC status code.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterable, AsyncIterator, Iterable, Iterator

import grpc
import numpy as np

from ..errors import UserError
from .v1 import codec_pb2 as pb
from .v1 import codec_pb2_grpc as pb_grpc
from .wire import audio_to_bytes, bytes_to_audio

FORMATS = {"linear16": pb.LINEAR16, "float32": pb.FLOAT32}


class ServiceError(UserError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"server answered {code.name}: {details}")
        self.code = code
        self.details = details


def _wrap(err: grpc.RpcError) -> ServiceError:
    return ServiceError(err.code(), err.details() or "")


@dataclass
class Frame:
    index: int
    time_offset_s: float
    tokens: np.ndarray  # [K] int64


def _channel_args(max_message_bytes: int) -> list:
    return [("grpc.max_send_message_length", max_message_bytes), ("grpc.max_receive_message_length", 64 << 20)]


def _credentials(tls_root: str | bytes | None, tls: bool):
    if not tls and tls_root is None:
        return None
    root = tls_root
    if isinstance(tls_root, str):
        with open(tls_root, "rb") as f:
            root = f.read()
    return grpc.ssl_channel_credentials(root_certificates=root)


def _audio_bytes(chunk, fmt: int) -> bytes:
    if isinstance(chunk, (bytes, bytearray, memoryview)):
        return bytes(chunk)
    return audio_to_bytes(np.asarray(chunk, dtype=np.float32).reshape(-1), fmt)


def encode_requests(chunks: Iterable, config: pb.EncodeConfig) -> Iterator[pb.StreamEncodeRequest]:
    yield pb.StreamEncodeRequest(config=config)
    for chunk in chunks:
        yield pb.StreamEncodeRequest(audio=_audio_bytes(chunk, config.format))


def decode_requests(frames: Iterable, config: pb.DecodeConfig, frames_per_message: int = 1):
    """frames: iterable of [K] token arrays, or of [K, t] arrays (sent t frames per message)."""
    yield pb.StreamDecodeRequest(config=config)
    for block in frames:
        block = np.asarray(block)
        block = block[:, None] if block.ndim == 1 else block
        cols = [block[:, t] for t in range(block.shape[1])]
        for i in range(0, len(cols), frames_per_message):
            msg = pb.TokenFrames(frames=[pb.TokenFrame(tokens=c.tolist()) for c in cols[i:i + frames_per_message]])
            yield pb.StreamDecodeRequest(frames=msg)


def _frames(response: pb.StreamEncodeResponse) -> list[Frame]:
    return [Frame(f.index, f.time_offset_s, np.asarray(f.tokens, dtype=np.int64)) for f in response.frames]


class _Base:
    def __init__(self, target: str, token: str | None = None, tls_root: str | bytes | None = None, tls: bool = False,
                 max_message_bytes: int = 4 << 20) -> None:
        self.target = target
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.credentials = _credentials(tls_root, tls)
        self.options = _channel_args(max_message_bytes)

    @staticmethod
    def encode_config(model: str = "", sample_rate: int = 16000, fmt: str | int = "float32", channels: int = 1,
                      num_codebooks: int = 0, session_id: str = "") -> pb.EncodeConfig:
        fmt = FORMATS[fmt] if isinstance(fmt, str) else fmt
        return pb.EncodeConfig(model=model, sample_rate_hz=sample_rate, format=fmt, channels=channels,
                               num_codebooks=num_codebooks, session_id=session_id)

    @staticmethod
    def decode_config(model: str = "", num_codebooks: int = 0, sample_rate: int = 0, fmt: str | int = "float32",
                      session_id: str = "") -> pb.DecodeConfig:
        fmt = FORMATS[fmt] if isinstance(fmt, str) else fmt
        return pb.DecodeConfig(model=model, num_codebooks=num_codebooks, sample_rate_hz=sample_rate, format=fmt,
                               session_id=session_id)


class CodecClient(_Base):
    """Blocking client."""

    def __init__(self, target: str, **kwargs) -> None:
        super().__init__(target, **kwargs)
        if self.credentials is None:
            self.channel = grpc.insecure_channel(target, options=self.options)
        else:
            self.channel = grpc.secure_channel(target, self.credentials, options=self.options)
        self.stub = pb_grpc.CodecStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "CodecClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def list_models(self) -> pb.ListModelsResponse:
        try:
            return self.stub.ListModels(pb.ListModelsRequest(), metadata=self.metadata)
        except grpc.RpcError as err:
            raise _wrap(err) from None

    def model_info(self, model: str = "") -> pb.ModelInfo:
        try:
            return self.stub.GetModelInfo(pb.GetModelInfoRequest(model=model), metadata=self.metadata)
        except grpc.RpcError as err:
            raise _wrap(err) from None

    def stream_encode(self, chunks: Iterable, **config) -> Iterator[Frame]:
        """Token frames as the server completes them; `chunks` are float32 arrays (or raw bytes)."""
        try:
            for response in self.stub.StreamEncode(encode_requests(chunks, self.encode_config(**config)),
                                                   metadata=self.metadata):
                yield from _frames(response)
        except grpc.RpcError as err:
            raise _wrap(err) from None

    def stream_decode(self, frames: Iterable, frames_per_message: int = 1, **config) -> Iterator[np.ndarray]:
        """Audio chunks (float32 at the requested rate) as the server decodes the frames."""
        cfg = self.decode_config(**config)
        fmt = cfg.format or pb.FLOAT32
        try:
            for response in self.stub.StreamDecode(decode_requests(frames, cfg, frames_per_message), metadata=self.metadata):
                yield bytes_to_audio(response.audio, fmt)
        except grpc.RpcError as err:
            raise _wrap(err) from None

    def encode(self, audio: np.ndarray, **config) -> np.ndarray:
        """Whole clip -> codes int64 [K, T]."""
        cfg = self.encode_config(**config)
        try:
            r = self.stub.Encode(pb.EncodeRequest(config=cfg, audio=_audio_bytes(audio, cfg.format)), metadata=self.metadata)
        except grpc.RpcError as err:
            raise _wrap(err) from None
        return np.asarray(r.codes, dtype=np.int64).reshape(r.num_codebooks, r.num_frames)

    def decode(self, codes: np.ndarray, **config) -> np.ndarray:
        """codes [K, T] -> float32 audio."""
        codes = np.asarray(codes)
        cfg = self.decode_config(num_codebooks=codes.shape[0], **config)
        try:
            r = self.stub.Decode(pb.DecodeRequest(config=cfg, num_frames=codes.shape[1], codes=codes.reshape(-1).tolist()),
                                 metadata=self.metadata)
        except grpc.RpcError as err:
            raise _wrap(err) from None
        return bytes_to_audio(r.audio, r.format)


class AsyncCodecClient(_Base):
    """asyncio client (grpc.aio); same methods as CodecClient, as coroutines / async iterators."""

    def __init__(self, target: str, **kwargs) -> None:
        super().__init__(target, **kwargs)
        if self.credentials is None:
            self.channel = grpc.aio.insecure_channel(target, options=self.options)
        else:
            self.channel = grpc.aio.secure_channel(target, self.credentials, options=self.options)
        self.stub = pb_grpc.CodecStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncCodecClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def model_info(self, model: str = "") -> pb.ModelInfo:
        try:
            return await self.stub.GetModelInfo(pb.GetModelInfoRequest(model=model), metadata=self.metadata)
        except grpc.RpcError as err:
            raise _wrap(err) from None

    async def _bidi(self, method, requests: AsyncIterator, parse) -> AsyncIterator:
        """Run a bidi call writing from a task (explicit writes: when the server ends the call early, its
        status - not a failed write - is what the caller sees)."""
        call = method(metadata=self.metadata)

        async def writer():
            try:
                first = True
                async for request in requests:
                    await call.write(request)
                    if first:
                        # Wait until the server admits the session (initial metadata) or ends the call:
                        # a write racing with an early rejection would turn its status into INTERNAL
                        # (grpc/grpc#36066).
                        first = False
                        await call.initial_metadata()
                        if call.done():
                            return
                await call.done_writing()
            except (grpc.RpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
                pass  # the call has ended; its status comes from the read side

        task = asyncio.create_task(writer())
        try:
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    break
                for item in parse(response):
                    yield item
            code = await call.code()
            if code != grpc.StatusCode.OK:
                raise ServiceError(code, await call.details() or "")
        except grpc.RpcError as err:
            raise _wrap(err) from None
        finally:
            task.cancel()
            call.cancel()  # no-op when the call already ended; frees the server's slot if we stopped early

    async def stream_encode(self, chunks: AsyncIterable | Iterable, **config) -> AsyncIterator[Frame]:
        cfg = self.encode_config(**config)

        async def requests():
            yield pb.StreamEncodeRequest(config=cfg)
            async for chunk in _aiter(chunks):
                yield pb.StreamEncodeRequest(audio=_audio_bytes(chunk, cfg.format))

        async for frame in self._bidi(self.stub.StreamEncode, requests(), _frames):
            yield frame

    async def stream_decode(self, frames: AsyncIterable | Iterable, **config) -> AsyncIterator[np.ndarray]:
        cfg = self.decode_config(**config)
        fmt = cfg.format or pb.FLOAT32

        async def requests():
            yield pb.StreamDecodeRequest(config=cfg)
            async for tokens in _aiter(frames):
                yield pb.StreamDecodeRequest(frames=pb.TokenFrames(frames=[pb.TokenFrame(tokens=np.asarray(tokens).tolist())]))

        async for audio in self._bidi(self.stub.StreamDecode, requests(), lambda r: [bytes_to_audio(r.audio, fmt)]):
            yield audio


async def _aiter(items: AsyncIterable | Iterable):
    if hasattr(items, "__aiter__"):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item

"""The streaming service against real servers on loopback (grvq_4cb:tiny, real speech from data/demo).

Server A: 34 batched slots, no auth (correctness, concurrency, bad inputs).
Server B: 2 slots stepped one by one (no batching), bearer token, TLS, 1 s idle timeout, small messages.
"""

import asyncio
import subprocess
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from neurocodec.audio import load_audio
from neurocodec.cli import main as cli_main
from neurocodec.codecs.checkpoint import load_codec
from neurocodec.data.manifest import read_manifest
from neurocodec.serve.client import AsyncCodecClient, CodecClient, ServiceError
from neurocodec.serve.server import ServerOptions, ServerThread
from neurocodec.serve.v1 import codec_pb2 as pb
from neurocodec.serve.v1 import codec_pb2_grpc as pb_grpc
from neurocodec.serve.wire import StreamingResampler

MODEL = "grvq_4cb:tiny"
MANIFEST = Path(__file__).resolve().parents[1] / "data" / "demo" / "manifest.jsonl"
TOKEN = "s3cret"
SR = 16000


@pytest.fixture(scope="module")
def codec():
    torch.set_grad_enabled(False)
    return load_codec(MODEL)


@pytest.fixture(scope="module")
def clips():
    """Real speech: 1 s pieces of the demo corpus (varied speakers and languages)."""
    utts = read_manifest(MANIFEST)
    step = max(1, len(utts) // 34)
    out = []
    for u in utts[::step][:34]:
        audio = load_audio(u.path, SR)[0, : SR].numpy()
        out.append(audio[: SR - 37 * len(out) % 300])  # assorted lengths, most not whole frames
    return out


@pytest.fixture(scope="module")
def server_a(codec):
    srv = ServerThread(ServerOptions(models=[MODEL], port=0, max_streams=34, max_message_bytes=256 << 10,
                                     grace_s=2.0), preloaded={MODEL: codec})
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")], check=True, capture_output=True)
    return d / "cert.pem", d / "key.pem"


@pytest.fixture(scope="module")
def server_b(codec, tls_files):
    cert, key = tls_files
    srv = ServerThread(ServerOptions(models=[MODEL], port=0, max_streams=2, batching=False, auth_token=TOKEN,
                                     tls_cert=str(cert), tls_key=str(key), idle_timeout_s=1.0,
                                     max_message_bytes=64 << 10, grace_s=2.0), preloaded={MODEL: codec})
    srv.start()
    yield srv
    srv.stop()


def client_a(srv):
    return CodecClient(f"127.0.0.1:{srv.port}")


def client_b(srv, token=TOKEN):
    return CodecClient(f"localhost:{srv.port}", token=token, tls_root=str(srv.options.tls_cert))


def chunked(audio, ms):
    n = int(SR * ms / 1000)
    return [audio[i:i + n] for i in range(0, len(audio), n)]


def offline(codec, audio):
    return codec.encode(torch.from_numpy(audio).view(1, 1, -1))[0].numpy()


def stacked(frames):
    assert [f.index for f in frames] == list(range(len(frames)))
    return np.stack([f.tokens for f in frames], axis=1)


def paced_session(connect, audio, pause_s, started=None):
    """A live session in a background thread: encode `audio` in 20 ms chunks sent `pause_s` apart, so it stays
    open while the test does other things. Returns the running thread and the dict that gets its codes;
    `started` (an Event), if given, is set once five chunks have gone."""
    result = {}

    def paced():
        for i, chunk in enumerate(chunked(audio, 20)):
            if i == 5 and started is not None:
                started.set()
            time.sleep(pause_s)
            yield chunk

    def run():
        with connect() as c:
            result["codes"] = stacked(list(c.stream_encode(paced(), sample_rate=SR)))

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def expect_status(code, fn, match):
    with pytest.raises(ServiceError) as info:
        fn()
    assert info.value.code == code, info.value
    assert match in info.value.details, info.value.details


# -- correctness -------------------------------------------------------------------------------------------
def test_streamed_tokens_equal_neurocodec_encode(server_a, codec, clips, tmp_path):
    wav = tmp_path / "clip.wav"
    sf.write(wav, clips[0], SR, subtype="FLOAT")
    # The reference is what `neurocodec encode` does: load_audio + codec.encode (same seeded model).
    reference = offline(codec, load_audio(wav, SR)[0].numpy())
    with client_a(server_a) as client:
        for ms in (10, 37, 100):
            frames = list(client.stream_encode(chunked(clips[0], ms), sample_rate=SR, fmt="float32"))
            assert np.array_equal(stacked(frames), reference), f"chunks of {ms} ms"
        linear16 = (np.clip(clips[0], -1, 32767 / 32768) * 32768).round().astype("<i2")
        frames = list(client.stream_encode([linear16[i:i + 555].tobytes() for i in range(0, len(linear16), 555)],
                                           sample_rate=SR, fmt="linear16"))
        assert np.array_equal(stacked(frames), offline(codec, linear16.astype(np.float32) / 32768))
        # fewer codebooks = the first K of the full codes (lower bitrate)
        frames = list(client.stream_encode(chunked(clips[0], 20), sample_rate=SR, num_codebooks=2))
        assert np.array_equal(stacked(frames), reference[:2])
        assert np.array_equal(client.encode(clips[0]), reference)  # unary Encode
    # The CLI client writes the same codes as `neurocodec encode`.
    out = tmp_path / "streamed.npy"
    assert cli_main(["stream", str(wav), "--server", f"127.0.0.1:{server_a.port}", "-o", str(out), "--chunk-ms", "37"]) == 0
    assert np.array_equal(np.load(out), reference)


def test_stream_decode_equals_offline_decode(server_a, codec, clips, tmp_path):
    codes = offline(codec, clips[1])
    expected = codec.decode(torch.from_numpy(codes).unsqueeze(0))[0, 0].numpy()
    with client_a(server_a) as client:
        audio = np.concatenate(list(client.stream_decode([codes[:, :7], codes[:, 7:]], frames_per_message=3,
                                                         num_codebooks=4)))
        np.testing.assert_allclose(audio, expected, atol=1e-4, rtol=0)
        np.testing.assert_allclose(client.decode(codes), expected, atol=1e-4, rtol=0)
        half = np.concatenate(list(client.stream_decode([codes[:2]], num_codebooks=2)))
        np.testing.assert_allclose(half, codec.decode(torch.from_numpy(codes[:2]).unsqueeze(0))[0, 0].numpy(), atol=1e-4)
        # audio out at another rate: the whole resampled signal, its tail (the resampler's flush) included
        at_24k = np.concatenate(list(client.stream_decode([codes], frames_per_message=5, sample_rate=24000)))
        np.testing.assert_allclose(at_24k, AF.resample(torch.from_numpy(expected), SR, 24000).numpy(), atol=1e-4, rtol=0)
    npy, out = tmp_path / "codes.npy", tmp_path / "out.wav"
    np.save(npy, codes.astype(np.int32))
    assert cli_main(["stream-decode", str(npy), "--server", f"127.0.0.1:{server_a.port}", "-o", str(out)]) == 0
    written, rate = sf.read(out, dtype="float32")
    assert rate == SR and len(written) == len(expected)
    np.testing.assert_allclose(written, np.clip(expected, -1, 1), atol=1.0 / 32768 + 1e-6)  # 16-bit WAV


def test_a_lone_session_costs_one_slot_not_all(server_a, codec, clips, monkeypatch):
    """A step runs on the sessions that have input, not on every slot of the server (34 here)."""
    worker = server_a.server.servicer.models[MODEL].worker
    batch_sizes = {"encode": [], "decode": []}
    for kind in batch_sizes:
        step = worker.selected_steps[kind]

        def spy(x, slots, step=step, seen=batch_sizes[kind]):
            seen.append(x.shape[0])
            return step(x, slots)

        monkeypatch.setitem(worker.selected_steps, kind, spy)
    with client_a(server_a) as client:
        codes = stacked(list(client.stream_encode(chunked(clips[2], 20), sample_rate=SR)))
        audio = np.concatenate(list(client.stream_decode([codes], num_codebooks=4)))
    assert np.array_equal(codes, offline(codec, clips[2]))
    expected = codec.decode(torch.from_numpy(codes).unsqueeze(0))[0, 0].numpy()
    np.testing.assert_allclose(audio, expected, atol=1e-4, rtol=0)
    assert batch_sizes["encode"] and set(batch_sizes["encode"]) == {1}
    assert batch_sizes["decode"] and set(batch_sizes["decode"]) == {1}


@pytest.mark.parametrize("batching", [True, False])
def test_sessions_that_fell_behind_catch_up_in_multi_frame_steps(codec, clips, batching):
    """Backlogged sessions advance several frames per step; outputs still equal offline, frame by frame."""
    import copy

    from neurocodec.serve.batcher import END, Worker

    model = copy.deepcopy(codec)
    worker = Worker(model, max_streams=4, batching=batching, max_frames_per_step=4)
    worker.open_streams()  # no worker thread: the test steps it
    loop = asyncio.new_event_loop()
    fs = worker.frame_size
    try:
        audios = [clips[3][: 5 * fs + 77], clips[4][: 3 * fs], clips[5][: 9 * fs]]
        enc = [worker.open("encode", 4, loop) for _ in audios]
        codes = [offline(codec, a) for a in audios]
        dec = [worker.open("decode", k, loop) for k in (4, 2)]
        for s, a in zip(enc, audios):
            worker.push(s, a)
        worker.end(enc[0])
        worker.push(dec[0], codes[2])
        worker.push(dec[1], codes[2][:2])
        steps = []
        while True:
            before = dict(worker.frames)
            stepped = [worker._step("encode"), worker._step("decode")]
            if not any(stepped):
                break
            steps.append({k: worker.frames[k] - before[k] for k in before})
        loop.run_until_complete(asyncio.sleep(0))  # deliver the outputs queued for each session
        # encode: 3 sessions x min(5, 3, 9, cap 4) = 3 frames, then 2 x min(2, 6) ...; decode: 2 x 4, 2 x 4, 2 x 1
        assert [s["encode"] for s in steps][:2] == [9, 4] and [s["decode"] for s in steps][:3] == [8, 8, 2]

        def drained(session):
            items = []
            while not session.queue.empty():
                items.append(session.queue.get_nowait())
            return items

        for i, s in enumerate(enc):
            items = drained(s)
            if i == 0:  # ended: the partial 6th frame was zero-padded, then END
                assert items[-1] is END
                items = items[:-1]
            assert [index for index, _ in items] == list(range(len(items)))
            assert np.array_equal(np.stack([c for _, c in items], axis=1), codes[i][:, : len(items)])
            assert len(items) == codes[i].shape[1]
        for s, k in zip(dec, (4, 2)):
            audio = np.concatenate([w for _, w in drained(s)])
            expected = codec.decode(torch.from_numpy(codes[2][:k]).unsqueeze(0))[0, 0].numpy()
            np.testing.assert_allclose(audio, expected, atol=1e-4, rtol=0)
    finally:
        worker.stop()
        loop.close()


def test_32_concurrent_streams_all_correct(server_a, codec, clips):
    chunk_ms = [10, 20, 37, 100]

    async def one(client, i):
        frames = [f async for f in client.stream_encode(chunked(clips[i], chunk_ms[i % 4]), sample_rate=SR)]
        return stacked(frames)

    async def main():
        async with AsyncCodecClient(f"127.0.0.1:{server_a.port}") as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    results = asyncio.run(main())
    for i, codes in enumerate(results):
        assert np.array_equal(codes, offline(codec, clips[i])), f"stream {i}"
    worker = server_a.server.servicer.models[MODEL].worker
    assert worker.frames["encode"] > worker.steps["encode"]  # frames of different sessions shared steps


def test_resampled_stereo_session(server_a, codec, clips):
    """8 kHz stereo LINEAR16 in: mixed down, resampled by the streaming resampler (== torchaudio offline)."""
    mono16 = clips[2]
    mono8 = AF.resample(torch.from_numpy(mono16), SR, 8000).numpy()
    stereo = np.stack([mono8, mono8], axis=1)  # identical channels: the mix-down is exact
    pcm = (np.clip(stereo, -1, 32767 / 32768) * 32768).round().astype("<i2")
    as_received = pcm[:, 0].astype(np.float32) / 32768
    expected = offline(codec, AF.resample(torch.from_numpy(as_received), 8000, SR).numpy())
    with client_a(server_a) as client:
        frames = list(client.stream_encode([pcm[i:i + 97].tobytes() for i in range(0, len(pcm), 97)],
                                           sample_rate=8000, fmt="linear16", channels=2))
    assert np.array_equal(stacked(frames), expected)


def test_streaming_resampler_equals_offline():
    rng = np.random.default_rng(0)
    for orig, new in [(8000, 16000), (48000, 16000), (44100, 16000), (16000, 22050)]:
        x = (0.3 * rng.standard_normal(orig // 5 + 11)).astype(np.float32)
        expected = AF.resample(torch.from_numpy(x), orig, new).numpy()
        for chunk in (1, 161, 10000):
            r = StreamingResampler(orig, new)
            got = np.concatenate([r.push(x[i:i + chunk]) for i in range(0, len(x), chunk)] + [r.flush()])
            assert got.shape == expected.shape
            np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


# -- bad input never harms other sessions -------------------------------------------------------------------------
def _raw_encode(client, messages):
    """Send raw StreamEncodeRequests; return the responses (raises ServiceError)."""
    try:
        return list(client.stub.StreamEncode(iter(messages), metadata=client.metadata))
    except grpc.RpcError as err:
        raise ServiceError(err.code(), err.details()) from None


def _raw_decode(client, messages):
    try:
        return list(client.stub.StreamDecode(iter(messages), metadata=client.metadata))
    except grpc.RpcError as err:
        raise ServiceError(err.code(), err.details()) from None


def test_bad_inputs_get_clear_statuses_while_another_session_carries_on(server_a, codec, clips):
    good_audio = np.concatenate([clips[3], clips[4]])
    # a well-behaved session, paced at 5x real time, open during all the bad requests
    thread, result = paced_session(lambda: client_a(server_a), good_audio, 0.004)
    time.sleep(0.2)
    E, D = pb.StreamEncodeRequest, pb.StreamDecodeRequest
    cfg = pb.EncodeConfig(sample_rate_hz=SR, format=pb.FLOAT32)
    dcfg = pb.DecodeConfig(num_codebooks=4)
    tok = pb.TokenFrames
    INVALID, FAILED, EXHAUSTED = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                                  grpc.StatusCode.RESOURCE_EXHAUSTED)
    with client_a(server_a) as c:
        expect_status(FAILED, lambda: _raw_encode(c, [E(audio=b"\0" * 640)]), "first message")
        expect_status(FAILED, lambda: _raw_decode(c, [D(frames=tok())]), "first message")
        expect_status(INVALID, lambda: _raw_encode(c, [E(config=pb.EncodeConfig(model="nope", sample_rate_hz=SR,
                                                                                 format=pb.FLOAT32))]), "unknown model")
        expect_status(INVALID, lambda: _raw_encode(c, [E(config=pb.EncodeConfig(sample_rate_hz=1000, format=pb.FLOAT32))]),
                      "sample_rate_hz=1000")
        expect_status(INVALID, lambda: _raw_encode(c, [E(config=pb.EncodeConfig(sample_rate_hz=SR))]), "format")
        expect_status(INVALID, lambda: _raw_encode(c, [E(config=pb.EncodeConfig(sample_rate_hz=SR, format=pb.LINEAR16)),
                                                       E(audio=b"\0" * 641)]), "641 bytes")
        nan = np.zeros(320, np.float32)
        nan[5] = np.nan
        expect_status(INVALID, lambda: _raw_encode(c, [E(config=cfg), E(audio=nan.tobytes())]), "NaN")
        inf = np.full(3, np.inf, np.float32)
        expect_status(INVALID, lambda: _raw_encode(c, [E(config=cfg), E(audio=inf.tobytes())]), "Inf")
        expect_status(INVALID, lambda: _raw_encode(c, [E(config=cfg), E(config=cfg)]), "only be sent once")
        expect_status(INVALID, lambda: _raw_encode(c, [E(config=pb.EncodeConfig(sample_rate_hz=SR, format=pb.FLOAT32,
                                                                                num_codebooks=3))]), "num_codebooks=3")
        expect_status(INVALID, lambda: _raw_decode(c, [D(config=dcfg), D(frames=tok(frames=[pb.TokenFrame(
            tokens=[1, 2, 1024, 3])]))]), "token id 1024 in codebook 2 is out of range")
        expect_status(INVALID, lambda: _raw_decode(c, [D(config=dcfg), D(frames=tok(frames=[pb.TokenFrame(
            tokens=[1, 2, 3])]))]), "3 ids")
        expect_status(INVALID, lambda: _raw_decode(c, [D(config=pb.DecodeConfig(num_codebooks=5))]), "num_codebooks=5")
        expect_status(INVALID, lambda: c.decode(np.full((4, 3), 5000)), "out of range")
        big = np.zeros(300 << 8, np.float32)  # 300 KiB > the server's 256 KiB message limit
        expect_status(EXHAUSTED, lambda: _raw_encode(c, [E(config=cfg), E(audio=big.tobytes())]), "")
        # a session that sends half a frame then a bad chunk: only it fails
        expect_status(INVALID, lambda: _raw_encode(c, [E(config=cfg), E(audio=np.zeros(100, np.float32).tobytes()),
                                                       E(audio=b"\0\0\0")]), "3 bytes")
    thread.join(timeout=60)
    assert np.array_equal(result["codes"], offline(codec, good_audio))
    worker = server_a.server.servicer.models[MODEL].worker
    assert worker.free_slots("encode") == 34 and worker.free_slots("decode") == 34


# -- server B: auth, TLS, slots, disconnects, idle timeout, unbatched stepping ------------------------------------
def test_auth_tls_and_unbatched_stepping(server_b, codec, clips):
    with client_b(server_b) as client:
        frames = list(client.stream_encode(chunked(clips[5], 37), sample_rate=SR))
        assert np.array_equal(stacked(frames), offline(codec, clips[5]))  # sessions stepped one by one: same codes
        assert client.model_info().max_streams == 2
    for token, match in ((None, "missing bearer token"), ("wrong", "wrong bearer token")):
        with client_b(server_b, token=token) as client:
            expect_status(grpc.StatusCode.UNAUTHENTICATED, lambda: list(client.stream_encode([clips[5]], sample_rate=SR)),
                          match)
            expect_status(grpc.StatusCode.UNAUTHENTICATED, client.model_info, match)
    with CodecClient(f"127.0.0.1:{server_b.port}", token=TOKEN) as plaintext:  # TLS is required
        with pytest.raises(ServiceError) as info:
            plaintext.model_info()
        assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_too_many_streams_and_disconnect_frees_the_slot(server_b, clips):
    async def main():
        client = AsyncCodecClient(f"localhost:{server_b.port}", token=TOKEN, tls_root=str(server_b.options.tls_cert))
        hold = asyncio.Event()

        async def slow_chunks():
            yield clips[6][:640]
            await hold.wait()

        async def first_frame():
            async for frame in client.stream_encode(slow_chunks(), sample_rate=SR):
                return frame  # leaving the generator cancels the call: a client that disconnects mid-stream

        holders = [client.stream_encode(slow_chunks(), sample_rate=SR) for _ in range(2)]
        firsts = [await h.__anext__() for h in holders]  # two sessions hold both slots
        assert [f.index for f in firsts] == [0, 0]
        with pytest.raises(ServiceError) as info:
            await first_frame()
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "slots are busy" in info.value.details
        for h in holders:
            await h.aclose()  # disconnect mid-stream
        for _ in range(100):  # the server notices the cancellation and frees the slots
            if (await client.model_info()).free_encode_slots == 2:
                break
            await asyncio.sleep(0.05)
        assert (await client.model_info()).free_encode_slots == 2
        assert (await first_frame()).index == 0
        await client.close()

    asyncio.run(main())


def test_idle_timeout(server_b):
    def idle_chunks():
        yield np.zeros(320, np.float32)
        time.sleep(2.0)  # > the 1 s idle timeout

    with client_b(server_b) as client:
        expect_status(grpc.StatusCode.OUT_OF_RANGE, lambda: list(client.stream_encode(idle_chunks(), sample_rate=SR)),
                      "idle timeout")


# -- operations ------------------------------------------------------------------------------------------------
def test_health_reflection_and_model_listing(server_a):
    channel = grpc.insecure_channel(f"127.0.0.1:{server_a.port}")
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "neurocodec.v1.Codec"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    answer = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in answer.list_services_response.service}
    assert {"neurocodec.v1.Codec", "grpc.health.v1.Health"} <= names
    models = pb_grpc.CodecStub(channel).ListModels(pb.ListModelsRequest())
    assert models.default_model == MODEL
    info = models.models[0]
    assert (info.sample_rate_hz, info.frame_size, info.num_codebooks, list(info.cardinalities)) == (SR, 320, 4, [1024] * 4)
    assert info.bitrate_bps == 2000 and info.algorithmic_latency_ms == 20
    channel.close()


def test_microphone_without_portaudio_is_a_clear_error(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "sounddevice", None)  # as if sounddevice/PortAudio could not be loaded
    assert cli_main(["stream", "--mic", "--server", "127.0.0.1:1", "-o", "unused.npy"]) == 2
    err = capsys.readouterr().err
    assert "PortAudio" in err and "Traceback" not in err


def test_health_is_not_serving_until_the_model_is_ready(codec):
    srv = ServerThread(ServerOptions(models=[MODEL], port=0, max_streams=1), preloaded={MODEL: codec})
    port = srv.start(load=False)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    health = health_pb2_grpc.HealthStub(channel)
    check = lambda: health.Check(health_pb2.HealthCheckRequest(service="neurocodec.v1.Codec")).status  # noqa: E731
    assert check() == health_pb2.HealthCheckResponse.NOT_SERVING
    with CodecClient(f"127.0.0.1:{port}") as c:
        expect_status(grpc.StatusCode.UNAVAILABLE, lambda: list(c.stream_encode([np.zeros(320, np.float32)])), "loading")
    srv.call(srv.server.load())
    assert check() == health_pb2.HealthCheckResponse.SERVING
    channel.close()
    srv.stop()


def test_a_dead_worker_turns_the_server_not_serving_and_refuses_new_sessions(codec, clips):
    """The model worker thread fails mid-session: that session ends with INTERNAL, health turns NOT_SERVING and
    a new session is refused with UNAVAILABLE at once (before, it was admitted and then hung)."""
    srv = ServerThread(ServerOptions(models=[MODEL], port=0, max_streams=2, grace_s=1.0), preloaded={MODEL: codec})
    srv.start()
    worker = srv.server.servicer.models[MODEL].worker

    def broken_step(frames, slots):
        raise RuntimeError("simulated model failure")

    worker.selected_steps["encode"] = broken_step  # the worker's own batched step: the next one kills the thread
    channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
    health = health_pb2_grpc.HealthStub(channel)
    check = lambda: health.Check(health_pb2.HealthCheckRequest(service="neurocodec.v1.Codec")).status  # noqa: E731
    assert check() == health_pb2.HealthCheckResponse.SERVING
    with client_a(srv) as c:
        expect_status(grpc.StatusCode.INTERNAL, lambda: list(c.stream_encode([clips[0]], sample_rate=SR)),
                      "simulated model failure")
    deadline = time.monotonic() + 5
    while check() != health_pb2.HealthCheckResponse.NOT_SERVING and time.monotonic() < deadline:
        time.sleep(0.01)
    assert check() == health_pb2.HealthCheckResponse.NOT_SERVING
    overall = health.Check(health_pb2.HealthCheckRequest(service="")).status
    assert overall == health_pb2.HealthCheckResponse.NOT_SERVING
    with client_a(srv) as c:
        for call in (lambda: list(c.stream_encode([clips[1]], sample_rate=SR)),
                     lambda: list(c.stream_decode([np.zeros(4, np.int64)], num_codebooks=4))):
            outcome = {}

            def attempt():
                try:
                    call()
                except ServiceError as err:
                    outcome["error"] = err

            caller = threading.Thread(target=attempt, daemon=True)  # a hang (the old behaviour) fails, not blocks
            caller.start()
            caller.join(timeout=1.0)
            assert not caller.is_alive(), "a new session hung on a server whose worker is dead"
            err = outcome.get("error")
            assert err is not None and err.code == grpc.StatusCode.UNAVAILABLE and "model worker failed" in err.details
    channel.close()
    srv.stop()


def test_loadtest_command(server_a, capsys):
    assert cli_main(["loadtest", "--server", f"127.0.0.1:{server_a.port}", "--streams", "3", "--seconds", "0.4",
                     "--json"]) == 0
    import json

    report = json.loads(capsys.readouterr().out)
    assert report["streams"] == 3 and report["rejected"] == 0 and report["failed"] == 0
    assert report["frames"] == 3 * 20 and 0 < report["p50_ms"] <= report["p99_ms"]
    assert cli_main(["loadtest", "--server", "10.1.2.3:50051", "--streams", "1"]) == 2  # loopback only


def test_graceful_drain_lets_running_sessions_finish(codec, clips):
    srv = ServerThread(ServerOptions(models=[MODEL], port=0, max_streams=2, grace_s=10.0), preloaded={MODEL: codec})
    srv.start()
    thread, result = paced_session(lambda: client_a(srv), clips[7], 0.01)
    time.sleep(0.2)
    drain = threading.Thread(target=lambda: srv.call(srv.server.drain()))
    drain.start()
    time.sleep(0.1)
    with client_a(srv) as c:  # new sessions are refused while draining
        with pytest.raises(ServiceError) as info:
            list(c.stream_encode([clips[7]], sample_rate=SR))
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
    thread.join(timeout=30)
    drain.join(timeout=30)
    assert np.array_equal(result["codes"], offline(codec, clips[7]))
    srv.stop()


def test_serve_command_drains_on_sigterm_with_json_logs(codec, clips, tmp_path):
    """`neurocodec serve` as a process: becomes SERVING, SIGTERM lets a running session finish, JSON logs."""
    import json
    import os
    import signal
    import sys

    from neurocodec.codecs.checkpoint import save_codec

    ckpt = save_codec(codec, tmp_path / "tiny.safetensors")  # a checkpoint loads without the codebook init
    with socket_port() as port:
        pass
    proc = subprocess.Popen([sys.executable, "-m", "neurocodec.cli", "serve", "--model", str(ckpt), "--port", str(port),
                             "--max-streams", "2", "--grace", "20", "--threads", "1"],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        health = health_pb2_grpc.HealthStub(channel)
        statuses = []
        for _ in range(600):
            try:
                statuses.append(health.Check(health_pb2.HealthCheckRequest(), timeout=1).status)
                if statuses[-1] == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        assert statuses[-1] == health_pb2.HealthCheckResponse.SERVING
        channel.close()
        sent = threading.Event()
        thread, result = paced_session(lambda: CodecClient(f"127.0.0.1:{port}"), clips[8], 0.01, started=sent)
        sent.wait(30)
        proc.send_signal(signal.SIGTERM)
        thread.join(60)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert np.array_equal(result["codes"], offline(codec, clips[8]))
    logs = [json.loads(line) for line in proc.stderr.read().splitlines() if line.startswith("{")]
    events = [entry["event"] for entry in logs]
    for expected in ("listening", "serving", "signal", "draining", "session_end", "stopped"):
        assert expected in events, events
    assert events.index("draining") < events.index("session_end")


class socket_port:
    """A free loopback port number."""

    def __enter__(self):
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return self.sock.getsockname()[1]

    def __exit__(self, *exc):
        self.sock.close()


def test_maximum_session_duration(codec, clips):
    srv = ServerThread(ServerOptions(models=[MODEL], port=0, max_streams=1, max_session_s=0.5), preloaded={MODEL: codec})
    srv.start()

    def paced():
        for chunk in chunked(clips[9], 20):
            time.sleep(0.02)
            yield chunk

    try:
        with client_a(srv) as c:
            expect_status(grpc.StatusCode.OUT_OF_RANGE, lambda: list(c.stream_encode(paced(), sample_rate=SR)),
                          "maximum duration of 0.5 s")
    finally:
        srv.stop()


def test_taking_results_wakes_the_worker_only_for_a_session_that_was_full(codec):
    """Every response a reader takes would otherwise make the worker scan all slots; only a session that had no
    room for results (and so was being skipped) needs the worker to look again."""
    import copy

    from neurocodec.serve.batcher import Worker

    worker = Worker(copy.deepcopy(codec), max_streams=2, max_outstanding=3)
    loop = asyncio.new_event_loop()
    try:
        session = worker.open("encode", 4, loop)
        session.outstanding = 3  # full: the worker skips it
        worker.wake.clear()
        worker.taken(session, 1)
        assert worker.wake.is_set() and session.outstanding == 2
        worker.wake.clear()
        worker.taken(session, 1)  # it had room already: nothing new for the worker
        assert not worker.wake.is_set() and session.outstanding == 1
    finally:
        loop.close()


def test_slow_reader_is_bounded(codec, clips):
    """A session whose results are not taken stops being stepped after max_outstanding frames."""
    import copy

    from neurocodec.serve.batcher import Worker

    async def main():
        worker = Worker(copy.deepcopy(codec), max_streams=2, max_outstanding=3)
        worker.start()
        try:
            session = worker.open("encode", 4, asyncio.get_running_loop())
            worker.push(session, clips[0][: 10 * 320])
            await asyncio.sleep(0.5)
            assert session.queue.qsize() == 3 and worker.buffered(session) == 7 * 320
            got = [session.queue.get_nowait() for _ in range(3)]
            worker.taken(session, 3)
            worker.end(session)
            while len(got) < 11:  # 7 more frames, then END, as the reader takes them
                got.append(await asyncio.wait_for(session.queue.get(), 10))
                worker.taken(session, 1)
        finally:
            worker.stop()
        return got

    got = asyncio.run(main())
    from neurocodec.serve.batcher import END

    assert got[-1] is END and [i for i, _ in got[:-1]] == list(range(10))
    assert np.array_equal(np.stack([codes for _, codes in got[:-1]], axis=1), offline(codec, clips[0][: 10 * 320]))

"""Every shipped config: streaming == offline (codes bitwise, audio within 1e-5), per session under masks."""

import random

import pytest
import torch

from neurocodec.codecs.checkpoint import load_codec
from neurocodec.codecs.commands import chunk_bounds, decode_streaming, encode_streaming
from neurocodec.config import available_configs
from neurocodec.errors import CodesError

from conftest import synthetic_speechlike

CONFIGS = ["grvq_4cb", "rvq_8cb", "fsq"]


@pytest.fixture(scope="module", params=CONFIGS)
def codec(request):
    return load_codec(f"{request.param}:tiny")


def signal(seconds, seed=0, batch=1):
    return torch.stack([torch.from_numpy(synthetic_speechlike(seconds, seed=seed + b)) for b in range(batch)]).unsqueeze(1)


def test_shipped_configs_are_tested():
    assert set(CONFIGS) <= set(available_configs())


@pytest.mark.parametrize("chunk", [1, 7, 317, 320, 323, 999, 100000], ids=lambda c: f"chunk{c}")
def test_streaming_encode_equals_offline(codec, chunk):
    seconds = {1: 0.05, 7: 0.3}.get(chunk, 0.9)  # tiny chunks mean thousands of steps: keep the clip short
    wav = signal(seconds, batch=2)
    offline = codec.encode(wav)
    assert offline.shape == (2, codec.num_codebooks, codec.num_frames(wav.shape[-1]))
    assert torch.equal(encode_streaming(codec, wav, chunk), offline)


def test_streaming_encode_random_chunks(codec):
    wav = signal(1.1, seed=3)
    offline = codec.encode(wav)
    rng = random.Random(5)
    for _ in range(3):
        pieces, pos = [], 0
        with codec.encoder.streaming(1):
            while pos < wav.shape[-1]:
                n = rng.choice([1, 2, rng.randint(1, 700), rng.randint(300, 2000)])
                pieces.append(codec.encode_step(wav[..., pos:pos + n]))
                pos += n
            pieces.append(codec.encode_flush())
        assert torch.equal(torch.cat(pieces, -1), offline)


@pytest.mark.parametrize("frames", [1, 2, 5, 64])
def test_streaming_decode_equals_offline(codec, frames):
    codes = codec.encode(signal(0.8, batch=2))
    offline = codec.decode(codes)
    assert offline.shape[-1] == codes.shape[-1] * codec.frame_size
    torch.testing.assert_close(decode_streaming(codec, codes, frames), offline, atol=1e-5, rtol=0)


@pytest.mark.parametrize("frames", [1, 3, 64])
def test_deeper_dilated_decoder_streams_exactly(frames):
    """Decoder residual blocks beyond the first (seanet.decoder_residual_layers) are dilated (dilation_base ** j):
    their longer causal context must carry across frame boundaries."""
    from neurocodec.codecs.checkpoint import build_codec, prepare_for_inference
    from neurocodec.config import load_config

    model = load_config("grvq_4cb", "tiny", ["model.seanet.decoder_residual_layers=3", "model.seanet.dilation_base=3"])
    codec = prepare_for_inference(build_codec(model["model"]), "cpu")
    with torch.no_grad():  # trained blocks are not the identity: make every weight matter
        for p in codec.decoder.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    codes = codec.encode(signal(0.8, batch=2))
    offline = codec.decode(codes)
    torch.testing.assert_close(decode_streaming(codec, codes, frames), offline, atol=1e-5, rtol=0)


@pytest.mark.parametrize("frames", [1, 3, 64])
def test_snake_decoder_streams_exactly(frames):
    """The gated Snake activations (seanet.decoder_snake) are elementwise: streaming needs no state from them."""
    from neurocodec.codecs.checkpoint import build_codec, prepare_for_inference
    from neurocodec.codecs.seanet import ELUSnake
    from neurocodec.config import load_config

    codec = prepare_for_inference(build_codec(load_config("grvq_4cb", "tiny", ["model.seanet.decoder_snake=true"])["model"]),
                                  "cpu")
    assert sum(isinstance(m, ELUSnake) for m in codec.decoder.modules()) == 13  # every ELU of the decoder
    assert not any(isinstance(m, ELUSnake) for m in codec.encoder.modules())
    with torch.no_grad():
        for m in codec.decoder.modules():
            if isinstance(m, ELUSnake):  # a trained model's: other frequencies per channel
                m.alpha.uniform_(0.5, 8.0)
    codes = codec.encode(signal(0.8, batch=2))
    offline = codec.decode(codes)
    torch.testing.assert_close(decode_streaming(codec, codes, frames), offline, atol=1e-5, rtol=0)


def test_batch_of_sessions_with_execution_masks(codec):
    """Sessions start at different times and advance at random: each still gets exactly its offline result."""
    batch, n_frames, f = 3, 12, codec.frame_size
    audio = [signal(n_frames * f / codec.sample_rate, seed=10 + b) for b in range(batch)]
    expected_codes = [codec.encode(a) for a in audio]
    expected_audio = [codec.decode(c) for c in expected_codes]
    rng = random.Random(1)
    got_codes = [[] for _ in range(batch)]
    got_audio = [[] for _ in range(batch)]
    pos = [0] * batch
    with codec.streaming(batch):
        codec.encoder.set_exec_mask(torch.zeros(batch, dtype=torch.bool))
        codec.encode_step(torch.randn(batch, 1, f))  # a masked-out step must change nothing
        while min(pos) < n_frames:
            mask = torch.tensor([pos[b] < n_frames and rng.random() < 0.5 for b in range(batch)])
            if not mask.any():
                continue
            chunk = torch.randn(batch, 1, f)  # garbage in masked slots
            for b in range(batch):
                if mask[b]:
                    chunk[b] = audio[b][0, :, pos[b] * f:(pos[b] + 1) * f]
            codec.set_exec_mask(mask)
            codes = codec.encode_step(chunk)
            frame_codes = codes.clone()
            for b in range(batch):
                if not mask[b]:
                    frame_codes[b] = 0  # garbage codes in masked slots for the decoder too
            wav = codec.decode_step(frame_codes)
            for b in range(batch):
                if mask[b]:
                    got_codes[b].append(codes[b:b + 1])
                    got_audio[b].append(wav[b:b + 1])
                    pos[b] += 1
            if rng.random() < 0.1:  # a session that ended is replaced by a new one in its slot
                done = [b for b in range(batch) if pos[b] >= n_frames]
                if done:
                    codec.reset_streaming(torch.tensor([b in done for b in range(batch)]))
    for b in range(batch):
        assert torch.equal(torch.cat(got_codes[b], -1), expected_codes[b])
        torch.testing.assert_close(torch.cat(got_audio[b], -1), expected_audio[b], atol=1e-5, rtol=0)


def test_reset_gives_a_fresh_session(codec):
    wav = signal(0.5, seed=7)
    with codec.encoder.streaming(1):
        codec.encode_step(signal(0.33, seed=8))
        codec.encoder.reset_streaming()
        codes = torch.cat([codec.encode_step(wav), codec.encode_flush()], -1)
    assert torch.equal(codes, codec.encode(wav))


def test_truncated_codebooks_decode(codec):
    codes = codec.encode(signal(0.4))
    for n in codec.allowed_num_codebooks():
        assert codec.decode(codes[:, :n]).shape[-1] == codes.shape[-1] * codec.frame_size
    bad = [n for n in range(1, codec.total_codebooks + 1) if n not in codec.allowed_num_codebooks()]
    for n in bad:
        with pytest.raises(CodesError):
            codec.decode(codes[:, :n])


def test_out_of_range_codes_are_refused(codec):
    codes = codec.encode(signal(0.2))
    codes[0, 0, 3] = codec.cardinality[0]
    with pytest.raises(CodesError, match="out of range"):
        codec.decode(codes)
    with pytest.raises(CodesError):
        codec.decode(codes.float())


def test_chunk_bounds_cover_everything_once():
    for total, chunk in [(1000, 112.0), (1000, 1.0), (999, 33.3), (5, 100.0)]:
        bounds = chunk_bounds(total, chunk)
        assert bounds[0][0] == 0 and bounds[-1][1] == total
        assert all(a < b for a, b in bounds)
        assert all(bounds[i][1] == bounds[i + 1][0] for i in range(len(bounds) - 1))


def test_config_seed_gives_identical_models():
    a, b = load_codec("grvq_4cb:tiny"), load_codec("grvq_4cb:tiny")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    wav = signal(0.5)
    codes = a.encode(wav)
    assert torch.equal(codes, b.encode(wav))
    assert codes.unique().numel() > 20  # k-means warm start spreads codes: not a degenerate all-zero model


def test_input_high_pass_ignores_a_dc_offset_and_keeps_checkpoints_compatible():
    """grvq_4cb's encoder high-passes its input (seanet.input_highpass_hz): a constant offset on the input changes
    no code once it has decayed (a few ms), and the filter adds no weights, so checkpoints load with or without it."""
    from neurocodec.codecs.checkpoint import build_codec
    from neurocodec.codecs.streaming import StreamingHighPass
    from neurocodec.config import load_config

    codec = load_codec("grvq_4cb:tiny")
    assert isinstance(codec.encoder.input_filter, StreamingHighPass) and codec.encoder.input_filter.cutoff_hz == 100
    wav = signal(1.0, seed=11).double()  # float64, so that adding the offset rounds the samples no coarser than encoding
    with torch.no_grad():
        plain, offset = codec.encode(wav), codec.encode(wav + 0.2)
    # The offset's step at the start decays as exp(-2 pi 100 t) (to 6e-17 of itself in 60 ms); frames whose
    # convolutional receptive field (2,717 samples, 8.5 frames) reaches back into that time may differ. The LSTM
    # bottleneck remembers longer in principle; its codes here agree from the same frame on.
    settle = 15
    assert torch.equal(plain[..., settle:], offset[..., settle:])
    config = load_config("grvq_4cb", "tiny")["model"]
    with_filter = build_codec(config).state_dict()
    config["seanet"]["input_highpass_hz"] = 0
    without = build_codec(config)
    assert set(without.state_dict()) == set(with_filter)
    without.load_state_dict(with_filter)


# -- stream-start priming (codecs/stream_start.py) ----------------------------------------------------------------------

def test_offline_codec_primes_each_stream_on_its_first_frame(codec):
    """encode = the encoder run on (first frame reversed, then the audio) minus the stand-in's code; decode = the
    decoder run on (first code frame, then the codes) minus the stand-in's audio. Each batch item uses its own first
    frame. `stream_start: none` is the old zero-state start, and gives other codes."""
    f = codec.frame_size
    wav = signal(0.3, seed=4, batch=2)
    assert wav.shape[-1] % f == 0
    codes = codec.encode(wav)
    with torch.no_grad():
        latent = codec.encoder(torch.cat([wav[..., :f].flip(-1), wav], -1).to(codec.encoder_dtype))
        assert torch.equal(codes, codec.quantizer.encode(latent, codec.num_codebooks)[..., 1:])
        audio = codec.decoder(codec.quantizer.decode(torch.cat([codes[..., :1], codes], -1)).float())[..., f:]
    torch.testing.assert_close(codec.decode(codes), audio, atol=1e-6, rtol=0)
    assert torch.equal(codec.encode(wav[1:]), codes[1:])  # the other item's first frame does not leak in
    codec.config.stream_start = "none"
    try:
        unprimed = codec.encode(wav)
        with torch.no_grad():
            assert torch.equal(unprimed, codec.quantizer.encode(codec.encoder(wav.to(codec.encoder_dtype)), codec.num_codebooks))
        assert not torch.equal(unprimed, codes)
        with codec.encoder.streaming(2):  # the streaming path follows the setting too
            assert torch.equal(torch.cat([codec.encode_step(wav[..., :7]), codec.encode_step(wav[..., 7:])], -1), unprimed)
    finally:
        codec.config.stream_start = "mirror"


@pytest.mark.parametrize("lengths", [(100,), (100, 50), (7, 7, 7), (319,), (150, 170, 200)], ids=str)
def test_a_stream_shorter_than_its_first_frame_is_held_until_whole(codec, lengths):
    """Before a session's first frame is whole there is nothing to prime with: encode_step holds the samples (no
    codes yet) and encode_flush pads them, as offline encode pads a clip shorter than one frame."""
    wav = signal(0.1, seed=9)[..., : sum(lengths)]
    pieces, pos = [], 0
    with codec.encoder.streaming(1):
        for n in lengths:
            pieces.append(codec.encode_step(wav[..., pos:pos + n]))
            pos += n
            if pos < codec.frame_size:
                assert pieces[-1].shape == (1, codec.num_codebooks, 0)
        pieces.append(codec.encode_flush())
    assert torch.equal(torch.cat(pieces, -1), codec.encode(wav))


def test_a_session_starting_beside_running_ones_needs_its_whole_first_frame(codec):
    """A new session in a batch whose other sessions are mid-stream is primed under an execution mask, which needs its
    whole first frame in one step: a shorter first chunk is refused with a clear error, and the batch loses nothing."""
    from neurocodec.codecs.streaming import StreamingShapeError

    f = codec.frame_size
    a, b = signal(0.2, seed=12), signal(0.2, seed=13)
    with codec.encoder.streaming(2):
        first = codec.encode_step(torch.cat([a[..., :f], b[..., :f]]))
        codec.encoder.reset_streaming(torch.tensor([False, True]))  # slot 1: a new session
        with pytest.raises(StreamingShapeError, match="whole first frame"):
            codec.encode_step(torch.cat([a[..., f:f + 7], b[..., :7]]))
        rest = codec.encode_step(torch.cat([a[..., f:], b[..., : a.shape[-1] - f]]))
    assert torch.equal(torch.cat([first[:1], rest[:1]], -1), codec.encode(a))
    assert torch.equal(rest[1:], codec.encode(b[..., : a.shape[-1] - f]))


def test_unknown_stream_start_mode_is_a_config_error():
    from neurocodec.codecs.checkpoint import build_codec
    from neurocodec.config import ConfigError, load_config

    config = load_config("grvq_4cb", "tiny", ["model.stream_start=zeros"])["model"]
    with pytest.raises(ConfigError, match="stream_start must be one of"):
        build_codec(config)

"""The committed gRPC stubs are exactly what grpcio-tools generates from proto/neurocodec/v1/codec.proto."""

from pathlib import Path

from neurocodec.serve import stubs


def test_committed_stubs_match_the_proto(tmp_path):
    fresh = stubs.generate(tmp_path)
    committed = Path(stubs.__file__).parent / "v1"
    for path in fresh:
        assert path.read_text() == (committed / path.name).read_text(), (
            f"{path.name} is stale: run `python -m neurocodec.serve.stubs` after editing the .proto")


def test_service_contract():
    from neurocodec.serve.v1 import codec_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["Codec"]
    methods = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}
    assert methods == {"StreamEncode": (True, True), "StreamDecode": (True, True), "Encode": (False, False),
                       "Decode": (False, False), "ListModels": (False, False), "GetModelInfo": (False, False)}

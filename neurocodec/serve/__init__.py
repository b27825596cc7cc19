"""The streaming gRPC service: audio <-> codec tokens for many concurrent sessions.

  wire.py       where a wire message becomes a tensor (sample formats, validation, streaming resampler)
  batcher.py    session slots and the model worker that steps every ready session in one batched call
  server.py     the grpc.aio servicer, auth, health, reflection, TLS, shutdown, logs
  client.py     Python client library (sync and asyncio)
  loadtest.py   the load generator (N real-time streams, per-frame latency percentiles)
  commands.py   `neurocodec serve | stream | stream-decode | loadtest`
  v1/           stubs generated from proto/neurocodec/v1/codec.proto (regenerate: python -m neurocodec.serve.stubs)
"""

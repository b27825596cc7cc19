"""Generated gRPC stubs (see neurocodec/serve/stubs.py). Do not edit by hand."""

"""neurocodec: train, stream and export neural audio codecs (see README.md and ../shared/DESIGN.md).

Package data: `configs/` (the shipped YAML configs, found by bare name), `serve/v1/codec.proto` (the service
contract; `proto/` at the repository root links to it) and `weights/` (the default model).
"""

__version__ = "0.1.0"

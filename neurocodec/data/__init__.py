"""Audio corpora: manifests, corpus builders (`neurocodec data ...`), training datasets."""

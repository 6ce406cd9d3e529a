"""Every byte of I/O: object storage, manifests, image codecs and sinks (arrives with issue #4)."""

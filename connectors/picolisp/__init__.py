"""PicoLisp's journaled pool: its file format, journal and blobs, the capture Source and the replica Sink."""

"""S3: the archive store, the archiver, point-in-time restore and retention."""

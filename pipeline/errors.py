"""The one exception type of pool-pipeline, with a retriable flag and the context a user needs."""

from __future__ import annotations


class PipelineError(Exception):
    """Any failure the pipeline reports.

    `retriable` says whether trying the same step again may succeed (a broker or S3
    outage) or not (corrupt input, checksum mismatch). The message always names the
    database, txn id and offset when they are known, so an operator can find the record.
    """

    def __init__(
        self,
        message: str,
        *,
        retriable: bool = False,
        database: str | None = None,
        txn_id: int | None = None,
        offset: int | None = None,
        topic: str | None = None,
    ) -> None:
        self.message = message
        self.retriable = retriable
        self.database = database
        self.txn_id = txn_id
        self.offset = offset
        self.topic = topic
        super().__init__(str(self))

    def __str__(self) -> str:
        ctx = [
            f"{name}={value}"
            for name, value in (
                ("database", self.database),
                ("txn", self.txn_id),
                ("topic", self.topic),
                ("offset", self.offset),
            )
            if value is not None
        ]
        return f"{self.message} [{' '.join(ctx)}]" if ctx else self.message

    def with_context(self, **ctx: object) -> PipelineError:
        """Fill in context fields that are still unknown (the caller knows more than the raiser)."""
        for key, value in ctx.items():
            if getattr(self, key, None) is None and value is not None:
                setattr(self, key, value)
        self.args = (str(self),)
        return self

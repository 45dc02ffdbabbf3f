"""Dead letters: a copy on ``llm.requests.dlq`` of a message the batcher cannot take, with
the reason in its ``error`` header and where it came from in ``origin.*`` headers.

The message's offset is held (``hold``) until Kafka acknowledges the copy, and only then
released: the batcher never commits past a message that is neither a row nor a durable
dead letter. A copy Kafka refuses is produced again (``retry``) while its partition is still
the batcher's; one too large for the broker is cut to ``DLQ_MAX_VALUE`` bytes, and says so.
"""

from __future__ import annotations

import logging

from confluent_kafka import KafkaError, KafkaException

from pipeline.constants import DLQ_TOPIC
from pipeline.intake.messages import MAX_REASON
from pipeline.intake.outages import Dependency

log = logging.getLogger(__name__)

#: a DLQ copy larger than this is cut (the broker refused the whole one); the header says so
DLQ_MAX_VALUE = 512 * 1024


class DeadLetters:
    """The batcher's DLQ producer, with the offsets its copies hold."""

    def __init__(self, producer, kafka: Dependency, stats: dict, *, hold, release, owned):
        self.producer, self.kafka, self.stats = producer, kafka, stats
        self.hold, self.release, self.owned = hold, release, owned
        #: copies Kafka refused, to produce again: (tp, offset, key, value, headers)
        self.refused: list[tuple] = []

    def send(self, tp: tuple, offset: int, key, value, error: str) -> None:
        """Copy a message to the DLQ; its offset is held until Kafka acknowledges the copy."""
        error = error if len(error) <= MAX_REASON else error[:MAX_REASON - 1] + "…"
        headers = [("error", error.encode("utf-8", "replace")), ("origin.topic", tp[0].encode()),
                   ("origin.partition", str(tp[1]).encode()), ("origin.offset", str(offset).encode())]
        self.hold(tp, offset)
        self.stats["dlq"] += 1
        log.warning("message %s[%d]@%d to DLQ: %s", tp[0], tp[1], offset, error)
        self._produce(tp, offset, key, value, headers)

    def _produce(self, tp, offset, key, value, headers) -> None:
        def delivered(err, _msg):
            if err is None:
                self.release(tp, offset)
                return
            if err.code() == KafkaError.MSG_SIZE_TOO_LARGE and value and len(value) > DLQ_MAX_VALUE:
                log.warning("DLQ copy of %s[%d]@%d is too large for the broker: sending its first %d bytes",
                            tp[0], tp[1], offset, DLQ_MAX_VALUE)
                self.refused.append((tp, offset, key, value[:DLQ_MAX_VALUE],
                                     headers + [("value.truncated", str(len(value)).encode())]))
            else:
                self.kafka.failed(err)
                self.refused.append((tp, offset, key, value, headers))
        try:
            self.producer.produce(DLQ_TOPIC, value=value, key=key, headers=headers, on_delivery=delivered)
        except BufferError:
            self.refused.append((tp, offset, key, value, headers))   # the local queue is full
        except KafkaException as e:
            self.kafka.failed(e)
            self.refused.append((tp, offset, key, value, headers))

    def retry(self) -> None:
        """Produce refused copies again, once Kafka may be tried; a revoked partition's are
        dropped (its next owner reads the message again)."""
        if self.refused and self.kafka.may_try():
            again, self.refused = self.refused, []
            for args in again:
                if self.owned(args[0]):
                    self._produce(*args)

"""Names shared by every process: topics, queues, tiers, key prefixes, states.

Kept in one place so a producer, the batcher, the workers and the SQL agree.
"""

REQUESTS_TOPIC = "llm.requests"
#: the fast lane: requests the producer classifies immediate never wait in a
#: partition behind a bulk job's backlog
IMMEDIATE_TOPIC = "llm.requests.immediate"
DLQ_TOPIC = "llm.requests.dlq"
REQUESTS_PARTITIONS = 6
IMMEDIATE_PARTITIONS = 2

# Kafka principals (SASL/SCRAM users; pipeline/intake/kafka_admin.py grants their ACLs).
#: the stack's own admin: the only principal that may create, alter or delete topics, users and ACLs
KAFKA_ADMIN_USER = "llmbatch-admin"
#: the batcher: reads the request topics (its groups), writes the DLQ
KAFKA_BATCHER_USER = "llmbatch-batcher"
#: the pipeline's own producer (submit, the scheduler's recurring jobs); services get producers of their own
KAFKA_SUBMIT_USER = "llmbatch-submit"
#: Kafka headers of a request message: who produced it, and its proof (pipeline/intake/kafka.py sign)
PRODUCER_HEADER = "llmbatch.producer"
SIGNATURE_HEADER = "llmbatch.signature"

TIERS = ("immediate", "peak", "offpeak", "background")
#: the tier whose latency comes before everything (it never waits for a prompt-cache group's first call)
IMMEDIATE_TIER = TIERS[0]
#: Tiers whose batches go to Celery as soon as they are written.
DISPATCHED_TIERS = ("immediate", "peak")
#: Tiers whose batches wait in Postgres until the scheduler releases them.
HELD_TIERS = ("offpeak", "background")


#: the Celery task that runs a batch (workers/tasks.py); producers send it by name
EXECUTE_BATCH_TASK = "llmbatch.execute_batch"


def queue_for(tier: str) -> str:
    """Celery queue name of a tier."""
    return f"tier.{tier}"


REDIS_PREFIX = "llmbatch:"

# Request states. Terminal ones never change again.
REQUEST_TERMINAL = ("succeeded", "failed", "cancelled")
# Job states (sql/006 checks them). A job ends ``completed`` only when every request
# succeeded; ``completed_with_errors`` when some failed (or were cancelled);
# ``failed`` when none succeeded (pipeline/stores/jobs.py refresh_jobs).
JOB_STATES = ("submitting", "running", "paused_budget",
              "completed", "completed_with_errors", "failed", "cancelled")
#: ends for ``--wait``; ``paused_budget`` can resume
JOB_TERMINAL = ("completed", "completed_with_errors", "failed", "cancelled", "paused_budget")
#: ends in which some request did not succeed: ``submit --wait`` exits 1
JOB_UNSUCCESSFUL = ("completed_with_errors", "failed", "cancelled", "paused_budget")

#: ends after which a job takes no new request: a message for one goes to the DLQ
JOB_FINISHED = ("completed", "completed_with_errors", "failed")

SIMULATOR_LABEL = "simulator (no API key set: answers are simulated, not from a real model)"

# Request urls (pipeline/endpoints has one module per url). Anthropic's line format has no url:
# its Messages API path names it. The price book says which of these each model serves.
CHAT_URL = "/v1/chat/completions"
RESPONSES_URL = "/v1/responses"
EMBEDDINGS_URL = "/v1/embeddings"
COMPLETIONS_URL = "/v1/completions"
MODERATIONS_URL = "/v1/moderations"
ANTHROPIC_MESSAGES_URL = "/v1/messages"
ENDPOINT_URLS = (CHAT_URL, RESPONSES_URL, EMBEDDINGS_URL, COMPLETIONS_URL, MODERATIONS_URL, ANTHROPIC_MESSAGES_URL)

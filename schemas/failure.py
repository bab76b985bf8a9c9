"""How the long-running processes (worker, sink, the API's view feed) behave when
something fails.

Expected failures (Kafka or the store briefly away) are retried with these
delays while offsets are held, so nothing is lost. Anything unexpected ends the
process with EXIT_UNSAFE rather than acknowledge work that was not done.
"""

RETRY_DELAYS_S = (0.2, 0.5, 1.0, 2.0, 5.0)
EXIT_UNSAFE = 70


def retry_delay(attempt: int) -> float:
    return RETRY_DELAYS_S[min(attempt, len(RETRY_DELAYS_S) - 1)]

"""The dispatch server: connected workers, the job state machine, the choice of worker."""

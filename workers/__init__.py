"""Celery tasks that run ``bitplan.core`` (sensitivity -> solve -> validate) for the
service. Arrives with the service issue; the CLI runs the same pipeline in-process."""

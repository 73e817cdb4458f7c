"""The REST API (FastAPI, ``/v1``) and, later, the web form. Imports the
torch-free contract (``bitplan.schemas``, the registries) and never torch: models
are read in a child process on upload, and jobs run on Celery workers."""

"""Celery tasks that run a job (sensitivity -> solve -> validate) for the service.

``workers.app`` builds a deployment's Celery app (``WorkerApp(settings)``),
``workers.tasks`` the task entry points, ``workers.jobs`` the work itself. Torch is
imported only inside the work, so the API process can enqueue without it.
"""

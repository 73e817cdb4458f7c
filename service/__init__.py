"""REST API and web form (FastAPI). Arrives with the service issue; it will import
``bitplan.schemas`` and the registries, never torch."""

"""The live web view (``brokerexec web``, ``docs/web.md``): jobs, operations and the fleet in a
browser, steered from there. Needs the ``web`` extra (Starlette, uvicorn, Jinja2)."""

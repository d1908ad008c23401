"""What the project's HTTP servers (registry, reference AI service; the gateway may share it) configure
and enforce alike: TLS, authentication (mutual TLS, bearer JWT, anonymous only when asked for), and
limits on what one request may cost (body size, query length, read timeouts, requests at once).

  config.py  the YAML sections (pydantic; an error names the key), loading a file
  auth.py    bearer JWT checks and the access middleware
  limits.py  the limits middleware and the uvicorn set-up (TLS, header read timeout)
"""

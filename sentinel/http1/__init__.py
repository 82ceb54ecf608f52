"""Our own HTTP/1.1 server, serving both ports (the traffic port and the ops port), on
httptools' public parser API (``httptools.HttpRequestParser`` and its callbacks).
Parsing stays in llhttp; these modules own everything else about a client connection,
one job each:

- ``limits``: ``HttpLimits``, what a hostile client meets (request line, header bytes
  and count, body size, header / body / idle keep-alive timeouts, open connections in
  all and per client address) and the config keys its refusals name;
- ``response``: ``Request`` (one whole request as read) and ``Response`` (framing of
  the one answer to it: a whole body with its length, or a chunked stream; status lines);
- ``refusals``: what the connection refuses itself (a limit, a timeout, bad framing)
  and the message naming the limit's config key;
- ``connection``: ``HttpConnection``, the asyncio protocol of one client connection and
  the one class that owns its flow control: parsing, limits, timers, keep-alive,
  pipelining order and flow control in both directions;
- ``server``: ``HttpServer`` (bind, the cap on open connections, serve, stop),
  ``ServerEvents`` (what it counts) and ``ProxyBindError``;
- ``asgi``: ``AsgiHandler``, an ASGI app (the ops port's Starlette app) as a handler.

Import names from the module that owns them (``sentinel.http1.server`` ...).
"""

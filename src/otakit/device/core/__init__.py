"""The device's protocol logic, once and without I/O (sans-I/O, as h11 or python-tuf's trusted
metadata set): state machines that take responses, chunks and boot results and say what to ask,
write or report next. No sockets, threads or event loops here: the agent (httpx, paho, threads),
the fleet simulator (asyncio) and ``otakit subscriber`` drive them; only their I/O differs."""

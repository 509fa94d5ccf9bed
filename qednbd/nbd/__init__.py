"""The NBD protocol, sans I/O: bytes in, events out; replies out as bytes.

* :mod:`qednbd.nbd.constants` — wire constants and precompiled message structs.
* :mod:`qednbd.nbd.handshake` — the server side of the fixed-newstyle negotiation.
* :mod:`qednbd.nbd.transmission` — request framing and validation; reply encoding.

Nothing here touches a socket, a file or an event loop, and nothing imports :mod:`qednbd.qed`;
the server (``server.py``) moves the bytes and ``export.py`` maps requests onto an image.
"""

"""The socket guard both network tests put in a child interpreter: every connection and name lookup is recorded in
``tried`` and refused (tests/test_warnings.py runs it with ``-c``, tests/test_quiet_offline.py as ``sitecustomize``)."""

SOURCE = r'''
import socket
tried = []
def _refuse(*args, **kwargs):
    tried.append(repr(args[1:] if args and isinstance(args[0], socket.socket) else args)[:120])
    raise OSError("network blocked by the test")
socket.socket.connect = socket.socket.connect_ex = _refuse
socket.getaddrinfo = socket.create_connection = _refuse
'''

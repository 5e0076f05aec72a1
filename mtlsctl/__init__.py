"""mtlsctl: run the private Certificate Authority behind nginx mutual TLS.

The openssl binary does every cryptographic step; mtlsctl lays out the PKI the way the guide
("Mastering Mutual TLS (mTLS) with Nginx") does, and adds the safety the guide's hand-run
commands and scripts lack: validation before any write, a lock, rollback, and no secret on argv.
"""

__version__ = "0.1.0"

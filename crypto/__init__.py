"""End-to-end encryption (PROTOCOL.md section 5): the PyNaCl client library and the key directory.

Not built yet (issue 5). The server already accepts only envelope-shaped bodies outside the
plaintext namespaces (`channels.body`) and stores them as sent; signature verification against
registered device keys and the `keys.*` ops arrive with this package.
"""

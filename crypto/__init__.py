"""End-to-end encryption (docs/protocol-v1.md section 5): the PyNaCl client library and the server's
key directory. The threat model is in docs/threat-model.md.

Offers, for apps (client side):
- `SecureClient` (`crypto.client`): send text and read decrypted messages; keys are found,
  fetched, shared and rotated for you; unreadable messages are surfaced with a reason;
- `DeviceKeys`, `encrypt`, `decrypt`, `seal_key`, `open_key`, `frank_commitment` (`crypto.e2ee`):
  the primitives, for clients in other languages to mirror.

For the server:
- `KeyDirectory` (`crypto.directory`): `keys.register` / `keys.lookup` / `keys.share` /
  `keys.fetch`, envelope signature checks before anything is stored, franking tags and the
  verification of reports. Device and channel keys live in `storage` (both stores).
"""

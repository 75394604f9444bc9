"""End-to-end encryption: the client libraries and the server's key directory.

v2 (docs/e2ee/, decision docs/decisions/0001-e2ee-v2.md) holds against the server itself.
For apps (client side):
- `client_v2.SecureClient`: send and read; keys are found, verified, shared and rotated for
  you; what does not verify comes back with `error`, what points at an attack is in `events`;
- `user_keys.UserKeys` (the user key that certifies devices, its recovery backup),
  `contacts` (safety numbers, the contact book), `envelope` (Olm/Megolm through vodozemac:
  shares and v2 envelopes), `membership` / `membership_state` (the signed membership log),
  `merkle` / `transparency` (the key log, its proofs and the client's monitor),
  `directory_view` (what a client believes about other people's keys), `rooms` (its view of
  the rooms' signed logs), `device_link` (adding a device from a trusted one by two QR codes),
  `client_store` (a device's whole state across restarts, encrypted).
For the server:
- `directory_v2` / `keylog` / `ops_v2` (`keys.publish`, `keys.query`, `keys.claim`,
  `keys.revoke`, `keys.log`, `keys.consistency`), `todevice` and `member_log` (to-device
  messages, the membership log), the v2 check of envelopes on publish.

v1 (docs/protocol-v1.md section 5) stays for v1 clients: `client.SecureClient`, `e2ee`
(`DeviceKeys`, `encrypt`, `decrypt`, sealed channel keys), `directory.KeyDirectory` and `ops`
(`keys.register` / `keys.lookup` / `keys.share` / `keys.fetch`, franking tags and reports).
The server never holds a key that opens a message. The threat model: docs/threat-model.md.
"""

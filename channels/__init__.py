"""Channels: names and namespaces, access rules, message bodies, brokers, fan-out and history.

Offers:
- `parse_channel` / `ChannelName` (`channels.names`): the channel naming rules;
- `AccessControl`, `Action`, `MembershipCache` (`channels.acl`): who may do what, checked on
  every operation;
- `parse_body` (`channels.body`): the end-to-end encrypted envelope and plaintext bodies;
- `InProcessBroker`, `RedisBroker` (`channels.broker`): moving frames between nodes;
- `Hub`, `Frame` (`channels.hub`): reference-counted per-node subscriptions, in-order delivery
  with gap repair from the store, each push encoded once per wire format;
- `ChannelService` (`channels.service`): publish, replay, history and read markers, bounded by
  the store timeout.

Channel data (history, memberships, read markers) is persisted through `storage`.
"""

"""One consumer per socket: {"op": "join", "room"} joins a group; {"op": "pub", "room", "id",
"text"} sends the text to the group (not back to the sender) and acknowledges it."""

import json

from channels.generic.websocket import AsyncWebsocketConsumer


class Room(AsyncWebsocketConsumer):
    async def receive(self, text_data=None, bytes_data=None):
        msg = json.loads(text_data)
        if msg["op"] == "join":
            await self.channel_layer.group_add(msg["room"], self.channel_name)
            await self.send(text_data='{"joined":true}')
        elif msg["op"] == "pub":
            await self.channel_layer.group_send(
                msg["room"],
                {"type": "room.message", "text": msg["text"], "sender": self.channel_name},
            )
            await self.send(text_data=json.dumps({"ack": msg["id"]}))

    async def room_message(self, event):
        if event["sender"] != self.channel_name:
            await self.send(text_data=event["text"])

"""A real Matrix client (matrix-nio) chatting through the msgnode proxy.

Usage: nio_chat.py PROXY_URL USER PASSWORD
Logs in through the proxy, creates a room, sends an allowed message and a message of a type
the shipped policy forbids, then syncs. Prints one JSON object with what happened; the Rust
test (tests/pep_synapse.rs) asserts on it.
"""
import asyncio
import json
import sys

from nio import AsyncClient, LoginResponse, RoomCreateResponse, RoomSendResponse, SyncResponse


async def main(proxy: str, user: str, password: str) -> dict:
    client = AsyncClient(proxy, f"@{user}:localhost")
    report = {}
    try:
        login = await client.login(password)
        report["login"] = isinstance(login, LoginResponse)
        created = await client.room_create(name="nio through msgnode")
        report["room_created"] = isinstance(created, RoomCreateResponse)
        room = created.room_id
        sent = await client.room_send(room, "m.room.message", {"msgtype": "m.text", "body": "hello from nio"})
        report["allowed_send"] = isinstance(sent, RoomSendResponse)
        denied = await client.room_send(room, "com.example.nio-secret", {"body": "should not pass"})
        report["denied_send_is_error"] = not isinstance(denied, RoomSendResponse)
        report["denied_status"] = getattr(denied, "status_code", None)
        report["denied_message"] = getattr(denied, "message", None)
        sync = await client.sync(timeout=0, full_state=True)
        bodies = []
        if isinstance(sync, SyncResponse) and room in sync.rooms.join:
            bodies = [getattr(e, "body", None) for e in sync.rooms.join[room].timeline.events]
        report["synced_bodies"] = [b for b in bodies if b]
    finally:
        await client.close()
    return report


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(*sys.argv[1:4]))))

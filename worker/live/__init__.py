"""Live progress: the event sink, learned and static ETAs, the GPU/RSS monitor, the live hub, the
HTTP/WebSocket server with its status page, and `status --follow`.

May import: `worker.task`, `worker.config`, `worker.store`, `worker.loop` (the EventSink protocol it
implements) and `worker.tasks.params` (which model a row needs). GPU facts (torch, `wan_engine.vram`)
are read lazily, inside the functions that probe the device, never at import.
"""

"""An in-process Kubernetes API server on loopback, for tests (envtest's contract, no controllers).

    server = ApiServer().start()          # a background thread with its own event loop
    server.url                            # http://127.0.0.1:<port>
    ...
    server.stop()

or `python -m tests.kube.apiserver --port 8001`. See README.md for what it does and does not do.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field

import aiohttp
import yaml
from aiohttp import web

from . import openapi
from .errors import ApiError, bad_request, gone
from .store import Store, Watcher
from .table import to_table

log = logging.getLogger(__name__)

VERSION_INFO = {"major": "1", "minor": "37", "gitVersion": "v1.37.0-emulator", "gitCommit": "emulator",
                "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.25",
                "compiler": "gc", "platform": "linux/amd64"}
# Written on Services by the process kubelet: {"<service port>": <loopback port of a ready backend>}.
SERVICE_PORTS_ANNOTATION = "kubelet.internvl.test/ports"
PATCH_TYPES = {"application/merge-patch+json": "merge", "application/json-patch+json": "json",
               "application/strategic-merge-patch+json": "strategic", "application/apply-patch+yaml": "apply",
               "application/apply-patch+cbor": "apply"}


@dataclass
class RequestRecord:
    """One request as a test sees it: the Kubernetes verb, the path and the body's content type."""
    method: str
    verb: str
    path: str
    query: dict
    content_type: str
    user_agent: str
    status: int = 0


@dataclass
class Fault:
    """Make the next `times` requests matching method+path fail: an HTTP `status` error, or (with
    `delay`) a stall of that many seconds before the answer, or a dropped connection (`drop`)."""
    path: str  # a regex searched in the path
    method: str | None = None
    status: int = 500
    times: int = 1
    delay: float = 0.0
    drop: bool = False
    watch: bool | None = None  # None: any; True: watches only; False: non-watch requests only
    user_agent: str | None = None  # a regex searched in the User-Agent header (e.g. one client only)
    hits: int = 0

    def matches(self, method: str, path: str, is_watch: bool, user_agent: str = "") -> bool:
        if self.times <= 0 or (self.method and self.method.upper() != method):
            return False
        if self.watch is not None and self.watch != is_watch:
            return False
        if self.user_agent is not None and re.search(self.user_agent, user_agent) is None:
            return False
        return re.search(self.path, path) is not None


@dataclass
class Route:
    group: str
    version: str
    namespace: str = ""
    plural: str = ""
    name: str = ""
    sub: str = ""


def parse_path(path: str) -> Route | None:
    parts = [p for p in path.split("/") if p]
    if not parts:
        return None
    if parts[0] == "api" and len(parts) >= 2:
        route, rest = Route("", parts[1]), parts[2:]
    elif parts[0] == "apis" and len(parts) >= 3:
        route, rest = Route(parts[1], parts[2]), parts[3:]
    else:
        return None
    if not rest:
        return route
    if rest[0] == "namespaces" and len(rest) >= 2:
        if len(rest) == 2 or (len(rest) == 3 and rest[2] in ("status", "finalize") and not route.group):
            route.plural, route.name = "namespaces", rest[1]
            route.sub = rest[2] if len(rest) == 3 else ""
            return route
        route.namespace, rest = rest[1], rest[2:]
    route.plural = rest[0]
    if len(rest) >= 2:
        route.name = rest[1]
    if len(rest) >= 3:
        route.sub = "/".join(rest[2:])
    return route


def _verb(method: str, route: Route | None, query) -> str:
    if route is None or not route.plural:
        return "get"
    if method == "GET":
        if query.get("watch") in ("true", "1"):
            return "watch"
        return "get" if route.name else "list"
    return {"POST": "create", "PUT": "update", "PATCH": "patch",
            "DELETE": "delete" if route.name else "deletecollection"}.get(method, method.lower())


class ApiServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, history_size: int = 5000,
                 bookmark_interval: float = 2.0, log_dir: str | None = None, gc_interval: float = 0.5):
        self.host, self.port = host, port
        self.store = Store(history_size=history_size)
        self.bookmark_interval = bookmark_interval
        self.log_dir = log_dir  # where the kubelet writes <ns>/<pod>/<container>.log
        self.gc_interval = gc_interval
        self.requests: list[RequestRecord] = []
        self.faults: list[Fault] = []
        self._lock = threading.Lock()
        self._watchers: list[Watcher] = []
        self._gone_next_watches = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._gc_pending = False
        self._tasks: set = set()

    # ---- lifecycle ----------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        return app

    async def start_async(self) -> "ApiServer":
        self._loop = asyncio.get_running_loop()
        self.store.on_change = self._schedule_gc
        # a short shutdown_timeout: open watch streams must not hold a test's teardown for a minute
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False, shutdown_timeout=0.2)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        self._tasks.add(asyncio.ensure_future(self._gc_loop()))
        return self

    async def stop_async(self) -> None:
        for w in list(self._watchers):
            w.closed = True
            w.queue.put_nowait(None)
        for t in self._tasks:
            t.cancel()
        if self._runner:
            await self._runner.cleanup()

    def start(self) -> "ApiServer":
        """Serve from a daemon thread; returns once the port is bound."""
        ready = threading.Event()
        errors = []

        def run():
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start_async())
            except Exception as exc:  # pragma: no cover - bind errors
                errors.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.stop_async())
            loop.close()

        self._thread = threading.Thread(target=run, name="kube-apiserver-emulator", daemon=True)
        self._thread.start()
        ready.wait(10)
        if errors:
            raise errors[0]
        return self

    def stop(self) -> None:
        if self._loop and self._thread:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def call(self, fn, *args):
        """Run fn(*args) on the server's loop thread (where the store lives) and return its result."""
        if self._loop is None or threading.current_thread() is self._thread:
            return fn(*args)

        async def wrapper():
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(wrapper(), self._loop).result(10)

    # ---- test hooks ---------------------------------------------------------------------------
    def inject_fault(self, path: str, method: str | None = None, status: int = 500, times: int = 1,
                     delay: float = 0.0, drop: bool = False, watch: bool | None = None,
                     user_agent: str | None = None) -> Fault:
        fault = Fault(path=path, method=method, status=status, times=times, delay=delay, drop=drop, watch=watch,
                      user_agent=user_agent)
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()

    def gone_on_next_watches(self, times: int = 1) -> None:
        """The next `times` watch requests get an ERROR event with code 410, whatever their RV."""
        with self._lock:
            self._gone_next_watches += times

    def expire_watches(self) -> int:
        """End every open watch with an ERROR 410 event (as after an etcd compaction)."""
        def do():
            for w in list(self._watchers):
                w.queue.put_nowait(("GONE", None))
            return len(self._watchers)
        return self.call(do)

    def compact(self) -> None:
        """Drop the event history: watches and Exact lists from older resourceVersions get 410."""
        self.call(self.store.compact)

    def requests_for(self, path_regex: str = "", verb: str | None = None, user_agent: str | None = None):
        with self._lock:
            recs = list(self.requests)
        return [r for r in recs if re.search(path_regex, r.path) and (verb is None or r.verb == verb)
                and (user_agent is None or user_agent in r.user_agent)]

    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    # ---- garbage collection ---------------------------------------------------------------------
    def _schedule_gc(self) -> None:
        if not self._gc_pending and self._loop:
            self._gc_pending = True
            self._loop.call_soon(self._run_gc)

    def _run_gc(self) -> None:
        self._gc_pending = False
        for _ in range(50):
            if not self.store.collect_garbage():
                break

    async def _gc_loop(self) -> None:
        while True:
            await asyncio.sleep(self.gc_interval)
            try:
                self._run_gc()
            except Exception:  # pragma: no cover - never let GC kill the server
                log.exception("garbage collection failed")

    # ---- HTTP -------------------------------------------------------------------------------
    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path, query = request.path, request.rel_url.query
        route = parse_path(path)
        verb = _verb(request.method, route, query)
        rec = RequestRecord(request.method, verb, path, dict(query), request.headers.get("Content-Type", ""),
                            request.headers.get("User-Agent", ""))
        with self._lock:
            self.requests.append(rec)
            fault = next((f for f in self.faults if f.matches(request.method, path, verb == "watch", rec.user_agent)), None)
            if fault:
                fault.times -= 1
                fault.hits += 1
        try:
            if fault:
                if fault.delay:
                    await request.read()  # the request has arrived whole: a client giving up now can't undo it
                    await asyncio.sleep(fault.delay)
                if fault.drop:
                    request.transport.close()
                    rec.status = 0
                    return web.Response(status=500)
                if fault.status:
                    raise ApiError(fault.status, "InternalError" if fault.status >= 500 else "Injected",
                                   f"injected fault for {request.method} {path}")
            resp = await self._handle(request, route, verb)
        except ApiError as exc:
            resp = self._json(exc.status(), exc.code)
        except Exception as exc:  # surface bugs as 500 Status, like a panicking handler
            log.exception("emulator error on %s %s", request.method, path)
            resp = self._json(ApiError(500, "InternalError", f"emulator error: {exc!r}").status(), 500)
        rec.status = resp.status
        return resp

    async def _service_proxy(self, request, rt, route) -> web.StreamResponse:
        """`services/<name>[:<port>]/proxy/<path>` (what `kubectl proxy` URLs use): forwarded to the loopback
        port of a ready backend, which the process kubelet writes on the Service (annotation
        kubelet.internvl.test/ports, {"<service port>": <host port>}). 503 when no backend is ready."""
        name, _, port = route.name.partition(":")
        svc = self.store.get(rt, route.namespace, name)
        spec_ports = (svc.get("spec") or {}).get("ports") or []
        if not port:
            port = str(spec_ports[0]["port"]) if spec_ports else ""
        elif not port.isdigit():
            port = next((str(p["port"]) for p in spec_ports if p.get("name") == port), port)
        backends = json.loads((svc["metadata"].get("annotations") or {}).get(SERVICE_PORTS_ANNOTATION) or "{}")
        if str(port) not in backends:
            raise ApiError(503, "ServiceUnavailable", f'no endpoints available for service "{name}"')
        target = f"http://127.0.0.1:{backends[str(port)]}/{route.sub[len('proxy'):].lstrip('/')}"
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("content-type", "accept")}
        body = await request.read()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=5)) as session:
            try:
                async with session.request(request.method, target, params=request.rel_url.query, data=body or None,
                                           headers=headers) as upstream:
                    resp = web.StreamResponse(status=upstream.status)
                    if "Content-Type" in upstream.headers:
                        resp.headers["Content-Type"] = upstream.headers["Content-Type"]
                    await resp.prepare(request)
                    async for chunk in upstream.content.iter_any():  # streams (SSE) pass through as they come
                        await resp.write(chunk)
                    await resp.write_eof()
                    return resp
            except aiohttp.ClientConnectionError as exc:
                raise ApiError(503, "ServiceUnavailable", f"error trying to reach service: {exc}") from exc

    @staticmethod
    def _json(body, status: int = 200, warnings=None) -> web.Response:
        headers = {"Cache-Control": "no-cache, private"}
        resp = web.Response(text=json.dumps(body), status=status, content_type="application/json",
                            headers=headers)
        for w in warnings or []:
            resp.headers.add("Warning", f'299 - "{w}"'.replace('\\', ''))
        return resp

    async def _handle(self, request, route, verb):
        path = request.path
        if route is None:
            return await self._non_resource(request, path)
        store = self.store
        if not route.plural:
            return self._group_version(route)
        rt = store.find_type(route.group, route.version, route.plural)
        if rt.namespaced is False and route.namespace:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        query = request.rel_url.query
        opts = dict(version=route.version, dry_run=query.get("dryRun") == "All",
                    strict=query.get("fieldValidation") == "Strict")
        manager = query.get("fieldManager")
        warnings: list[str] = []
        if rt.plural == "services" and route.name and (route.sub == "proxy" or route.sub.startswith("proxy/")):
            return await self._service_proxy(request, rt, route)
        if route.sub and route.sub not in ("status",) and not (route.sub in ("log", "binding") and rt.plural == "pods") \
                and not (route.sub == "finalize" and rt.plural == "namespaces"):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if verb == "watch":
            return await self._watch(request, rt, route)
        if verb == "list":
            return self._list(request, rt, route)
        if route.sub == "binding":
            body = await self._body(request)
            pod = store.get(rt, route.namespace, route.name)
            new = json.loads(json.dumps(pod))
            new["spec"]["nodeName"] = (body.get("target") or {}).get("name", "")
            store.update(rt, route.namespace, route.name, new, require_rv=False)
            return self._json({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                               "code": 201}, 201)
        if verb == "create":
            body = await self._body(request)
            obj = store.create(rt, route.namespace, body, manager=manager, warnings=warnings, **opts)
            return self._json(store.view(rt, obj, route.version), 201, warnings)
        if verb == "deletecollection":
            items = store.list(rt, route.namespace, query.get("labelSelector"), query.get("fieldSelector"))
            for o in items:
                store.delete(rt, o["metadata"].get("namespace", ""), o["metadata"]["name"])
            return self._json(self._list_body(rt, route.version, items))
        if route.sub == "log":
            return await self._logs(request, rt, route)
        sub = "status" if route.sub == "status" else None
        if verb == "get":
            obj = store.get(rt, route.namespace, route.name)
            return self._maybe_table(request, rt, route.version, [store.view(rt, obj, route.version)],
                                     {"resourceVersion": obj["metadata"]["resourceVersion"]}, single=True)
        if verb == "update":
            body = await self._body(request)
            obj = store.update(rt, route.namespace, route.name, body, subresource=sub, manager=manager,
                               warnings=warnings, **opts)
            return self._json(store.view(rt, obj, route.version), 200, warnings)
        if verb == "patch":
            ctype = request.headers.get("Content-Type", "").split(";")[0].strip()
            ptype = PATCH_TYPES.get(ctype)
            if ptype is None:
                raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format - "
                               f"accepted media types include: {', '.join(PATCH_TYPES)}")
            body = await self._body(request, yaml_ok=ptype == "apply")
            if ptype == "apply" and not manager:
                raise ApiError(422, "Invalid", "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required "
                                              "value: is required for apply patch")
            obj = store.patch(rt, route.namespace, route.name, ptype, body, subresource=sub, manager=manager,
                              force=query.get("force") == "true", warnings=warnings, **opts)
            return self._json(store.view(rt, obj, route.version), 200, warnings)
        if verb == "delete":
            body = await self._body(request, optional=True) or {}
            propagation = query.get("propagationPolicy") or body.get("propagationPolicy")
            if propagation is None and body.get("orphanDependents") is not None:
                propagation = "Orphan" if body["orphanDependents"] else "Background"
            grace = query.get("gracePeriodSeconds", body.get("gracePeriodSeconds"))
            grace = int(grace) if grace is not None else None
            obj, gone_now = store.delete(rt, route.namespace, route.name, propagation, grace,
                                         body.get("preconditions"), opts["dry_run"])
            if gone_now and not rt.is_custom:
                return self._json({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                                   "details": {"name": route.name, "group": rt.group, "kind": rt.plural,
                                               "uid": obj["metadata"]["uid"]}})
            return self._json(store.view(rt, obj, route.version), 200)
        raise ApiError(405, "MethodNotAllowed", f"{request.method} is not supported here")

    async def _body(self, request, yaml_ok=False, optional=False):
        raw = await request.read()
        if not raw:
            if optional:
                return None
            raise bad_request("the request body is empty")
        try:
            return json.loads(raw)
        except ValueError:
            if yaml_ok:
                try:
                    return yaml.safe_load(raw)
                except yaml.YAMLError as exc:
                    raise bad_request(f"invalid YAML: {exc}")
            raise bad_request("the body of the request was in an unknown format (JSON expected)")

    async def _non_resource(self, request, path):
        store = self.store
        if path == "/version":
            return self._json(VERSION_INFO)
        if path in ("/healthz", "/livez", "/readyz"):
            return web.Response(text="ok")
        if path == "/api":
            return self._json({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": f"{self.host}:{self.port}"}]})
        if path == "/apis":
            groups = [self._group_doc(g, vs) for g, vs in store.groups().items() if g]
            return self._json({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
        m = re.fullmatch(r"/apis/([^/]+)", path)
        if m and m.group(1) in store.groups():
            doc = self._group_doc(m.group(1), store.groups()[m.group(1)])
            return self._json(dict(doc, kind="APIGroup", apiVersion="v1"))
        if path == "/openapi/v3":
            return self._json(openapi.v3_root(store))
        m = re.fullmatch(r"/openapi/v3/(api/[^/]+|apis/[^/]+/[^/]+)", path)
        if m:
            parts = m.group(1).split("/")
            group, version = ("", parts[1]) if parts[0] == "api" else (parts[1], parts[2])
            if version not in store.groups().get(group, []):
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            return self._json(openapi.gv_document(store, group, version))
        if path == "/openapi/v2":
            if "protobuf" in request.headers.get("Accept", "") and "json" not in request.headers.get("Accept", ""):
                raise ApiError(406, "NotAcceptable", "only application/json is served by the emulator")
            return self._json(openapi.v2_document(store))
        raise ApiError(404, "NotFound", "the server could not find the requested resource")

    @staticmethod
    def _group_doc(group, versions):
        vs = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
        return {"name": group, "versions": vs, "preferredVersion": vs[0]}

    def _group_version(self, route):
        store = self.store
        if route.version not in store.groups().get(route.group, []):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        resources = []
        for rt in store.types.values():
            if rt.group == route.group and route.version in rt.versions:
                resources.extend(rt.discovery_entries())
        gv = f"{route.group}/{route.version}" if route.group else route.version
        return self._json({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv,
                           "resources": resources})

    # ---- list and watch -----------------------------------------------------------------------
    def _list_body(self, rt, version, items, meta=None):
        return {"kind": f"{rt.kind}List", "apiVersion": rt.api_version(version),
                "metadata": meta or {"resourceVersion": str(self.store.rv)},
                "items": [self.store.view(rt, o, version) for o in items]}

    def _list(self, request, rt, route):
        store, query = self.store, request.rel_url.query
        rv, match = query.get("resourceVersion"), query.get("resourceVersionMatch")
        if rv and match == "Exact" and int(rv) < store.history_floor:
            raise gone(f"The resourceVersion for the provided list is too old: {rv} < {store.history_floor}")
        items = store.list(rt, route.namespace, query.get("labelSelector"), query.get("fieldSelector"))
        meta = {"resourceVersion": str(store.rv)}
        token = query.get("continue")
        if token:
            try:
                state = json.loads(base64.urlsafe_b64decode(token.encode()))
            except Exception:
                raise bad_request("invalid continue token")
            if state["rv"] < store.history_floor:
                raise gone("The provided continue parameter is too old to display a consistent list result. "
                           "You can start a new list without the continue parameter.")
            start = tuple(state["after"])
            items = [o for o in items if (o["metadata"].get("namespace", ""), o["metadata"]["name"]) > start]
        limit = int(query.get("limit") or 0)
        if limit and len(items) > limit:
            last = items[limit - 1]["metadata"]
            meta["continue"] = base64.urlsafe_b64encode(json.dumps(
                {"rv": store.rv, "after": [last.get("namespace", ""), last["name"]]}).encode()).decode()
            meta["remainingItemCount"] = len(items) - limit
            items = items[:limit]
        return self._maybe_table(request, rt, route.version, [store.view(rt, o, route.version) for o in items],
                                 meta, single=False)

    def _maybe_table(self, request, rt, version, objs, meta, single):
        accept = request.headers.get("Accept", "")
        if "as=Table" in accept:
            include = request.rel_url.query.get("includeObject", "Metadata")
            return self._json(to_table(rt, version, objs, meta, include))
        if single:
            return self._json(objs[0])
        body = {"kind": f"{rt.kind}List", "apiVersion": rt.api_version(version), "metadata": meta, "items": objs}
        return self._json(body)

    async def _watch(self, request, rt, route):
        store, query = self.store, request.rel_url.query
        rv = query.get("resourceVersion") or ""
        timeout = float(query.get("timeoutSeconds") or 0) or None
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1")
        initial = query.get("sendInitialEvents") == "true"
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json",
                                                        "Transfer-Encoding": "chunked"})
        await resp.prepare(request)

        async def send(kind, obj):
            await resp.write((json.dumps({"type": kind, "object": obj}) + "\n").encode())

        async def send_gone(message):
            await send("ERROR", {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                 "message": message, "reason": "Expired", "code": 410})

        with self._lock:
            force_gone = self._gone_next_watches > 0
            if force_gone:
                self._gone_next_watches -= 1
        if force_gone:
            await send_gone("too old resource version: injected")
            return resp
        if rv not in ("", "0") and int(rv) < store.history_floor:
            await send_gone(f"too old resource version: {rv} ({store.history_floor})")
            return resp
        watcher = Watcher(rt.key, route.namespace or None,
                          _label_pred(query.get("labelSelector")), _field_pred(query.get("fieldSelector")),
                          asyncio.Queue())
        # registering and reading history happen in one loop step: no event is lost or doubled
        if rv in ("", "0") or initial:
            backlog = [("ADDED", store.view(rt, o, None)) for o in
                       store.list(rt, route.namespace, query.get("labelSelector"), query.get("fieldSelector"))]
        else:
            backlog = []
            for ev in store.events_since(int(rv)):
                probe = Watcher(watcher.key, watcher.namespace, watcher.label_pred, watcher.field_pred,
                                asyncio.Queue())
                probe.offer(ev)
                if not probe.queue.empty():
                    backlog.append(probe.queue.get_nowait())
        store.watchers.append(watcher)
        self._watchers.append(watcher)
        start_rv = store.rv
        deadline = time.monotonic() + timeout if timeout else None
        try:
            for kind, obj in backlog:
                await send(kind, self._versioned(rt, obj, route.version))
            if initial:
                await send("BOOKMARK", {"kind": rt.kind, "apiVersion": rt.api_version(route.version),
                                        "metadata": {"resourceVersion": str(start_rv),
                                                     "annotations": {"k8s.io/initial-events-end": "true"}}})
            while True:
                wait = self.bookmark_interval if bookmarks else 3600
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    wait = min(wait, left)
                try:
                    item = await asyncio.wait_for(watcher.queue.get(), wait)
                except asyncio.TimeoutError:
                    if bookmarks and (deadline is None or time.monotonic() < deadline):
                        await send("BOOKMARK", {"kind": rt.kind, "apiVersion": rt.api_version(route.version),
                                                "metadata": {"resourceVersion": str(store.rv)}})
                    continue
                if item is None:
                    break
                kind, obj = item
                if kind == "GONE":
                    await send_gone("too old resource version: the watch was expired by the test")
                    break
                await send(kind, self._versioned(rt, obj, route.version))
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            watcher.closed = True
            if watcher in store.watchers:
                store.watchers.remove(watcher)
            if watcher in self._watchers:
                self._watchers.remove(watcher)
        return resp

    @staticmethod
    def _versioned(rt, obj, version):
        obj = dict(obj)
        obj["apiVersion"] = rt.api_version(version)
        return obj

    # ---- logs ---------------------------------------------------------------------------------
    def log_path(self, namespace: str, pod: str, container: str, previous: bool = False) -> str | None:
        if not self.log_dir:
            return None
        return os.path.join(self.log_dir, namespace, pod, f"{container}{'.previous' if previous else ''}.log")

    async def _logs(self, request, rt, route):
        query = request.rel_url.query
        pod = self.store.get(rt, route.namespace, route.name)
        containers = [c["name"] for c in (pod.get("spec") or {}).get("containers") or []]
        container = query.get("container") or (containers[0] if containers else "")
        if container not in containers:
            raise bad_request(f"container {container} is not valid for pod {route.name}")
        path = self.log_path(route.namespace, route.name, container, query.get("previous") == "true")
        if not path or not os.path.exists(path):
            if query.get("previous") == "true":
                raise bad_request(f'previous terminated container "{container}" in pod "{route.name}" not found')
            raise bad_request(f'container "{container}" in pod "{route.name}" is waiting to start: '
                              "ContainerCreating")
        with open(path, "rb") as fh:
            data = fh.read()
        tail = query.get("tailLines")
        if tail is not None:
            lines = data.splitlines(keepends=True)
            data = b"".join(lines[-int(tail):]) if int(tail) > 0 else b""
        if query.get("limitBytes"):
            data = data[:int(query["limitBytes"])]
        if query.get("follow") != "true":
            return web.Response(body=data, content_type="text/plain")
        resp = web.StreamResponse(status=200, headers={"Content-Type": "text/plain"})
        await resp.prepare(request)
        await resp.write(data)
        offset = os.path.getsize(path)
        while True:  # follow until the pod's container is no longer running
            await asyncio.sleep(0.2)
            size = os.path.getsize(path) if os.path.exists(path) else offset
            if size > offset:
                with open(path, "rb") as fh:
                    fh.seek(offset)
                    await resp.write(fh.read())
                offset = size
            try:
                cur = self.store.get(rt, route.namespace, route.name)
            except ApiError:
                break
            if (cur.get("status") or {}).get("phase") in ("Succeeded", "Failed") and size == offset:
                break
        return resp


def _label_pred(text):
    from .selectors import parse_label_selector
    return parse_label_selector(text)


def _field_pred(text):
    from .selectors import parse_field_selector
    return parse_field_selector(text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Kubernetes API emulator on loopback (tests only)")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--log-dir", default=None, help="where the process kubelet writes pod logs")
    parser.add_argument("--kubeconfig", default=None, help="write a kubeconfig for this server here")
    parser.add_argument("--bookmark-interval", type=float, default=2.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    server = ApiServer(host=args.host, port=args.port, log_dir=args.log_dir,
                       bookmark_interval=args.bookmark_interval)

    async def serve():
        await server.start_async()
        if args.kubeconfig:
            from .binaries import write_kubeconfig
            write_kubeconfig(server.url, args.kubeconfig)
        print(f"serving on {server.url}", flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()

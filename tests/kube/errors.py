"""API errors as `kind: Status` objects, the shape every Kubernetes client decodes."""
from __future__ import annotations


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> dict:
        body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "code": self.code}
        if self.details:
            body["details"] = self.details
        return body


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def not_found(rt, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{rt.qualified_plural()} "{name}" not found',
                    {"name": name, "group": rt.group, "kind": rt.plural})


def already_exists(rt, name: str) -> ApiError:
    return ApiError(409, "AlreadyExists", f'{rt.qualified_plural()} "{name}" already exists',
                    {"name": name, "group": rt.group, "kind": rt.plural})


def conflict(rt, name: str, why: str = "the object has been modified; please apply your changes to "
                                      "the latest version and try again") -> ApiError:
    return ApiError(409, "Conflict", f'Operation cannot be fulfilled on {rt.qualified_plural()} "{name}": {why}',
                    {"name": name, "group": rt.group, "kind": rt.plural})


def invalid(rt, name: str, causes: list[tuple[str, str]]) -> ApiError:
    """causes: (field path, message). The message lists every cause, as the real server does."""
    text = ", ".join(f"{path}: {msg}" if path else msg for path, msg in causes)
    return ApiError(422, "Invalid", f'{rt.group_kind()} "{name}" is invalid: {text}',
                    {"name": name, "group": rt.group, "kind": rt.kind,
                     "causes": [{"reason": "FieldValueInvalid", "message": msg, "field": path}
                                for path, msg in causes]})


def gone(message: str = "too old resource version") -> ApiError:
    return ApiError(410, "Expired", message)

"""A tiny Kopf operator for the emulator tests: a Widget gets a child ConfigMap (adopted, so it is
garbage-collected with its parent); updates rewrite it; deletion goes through Kopf's finalizer."""
import kopf

DELETED = []


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_):
    settings.posting.level = 40  # keep Events few
    settings.watching.server_timeout = 10
    settings.persistence.finalizer = "example.com/widget-finalizer"


@kopf.on.login()
def login(**kwargs):
    # The kubernetes client reads $KUBECONFIG once, at import; a test sets it later. Kopf's own
    # kubeconfig login reads it at call time.
    return kopf.login_with_kubeconfig(**kwargs)


@kopf.on.create("example.com", "v1", "widgets")
def create_fn(spec, name, namespace, body, **_):
    import kubernetes
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{name}-child"},
          "data": {"size": str(spec["size"])}}
    kopf.adopt(cm, owner=body)
    kubernetes.client.CoreV1Api().create_namespaced_config_map(namespace, cm)
    return {"child": cm["metadata"]["name"]}


@kopf.on.update("example.com", "v1", "widgets", field="spec.size")
def update_fn(new, name, namespace, **_):
    import kubernetes
    kubernetes.client.CoreV1Api().patch_namespaced_config_map(f"{name}-child", namespace,
                                                              {"data": {"size": str(new)}})


@kopf.on.delete("example.com", "v1", "widgets")
def delete_fn(name, **_):
    DELETED.append(name)

{{/*
Chart name, or nameOverride. Cut to 63 characters: it ends up in label values, which are DNS-1123
labels (at most 63 characters).
*/}}
{{- define "internvl-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name prefix of every object: "<release>-<chart>", or just the release name when it already
contains the chart name (so `helm install internvl-operator .` does not give
"internvl-operator-internvl-operator"). Cut to 63 characters for the same reason as above.
*/}}
{{- define "internvl-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
"<chart>-<version>" for the helm.sh/chart label; "+" is not allowed in label values.
*/}}
{{- define "internvl-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every object of the release. The operator's own children carry
app.kubernetes.io/managed-by=internvl-operator instead; these say "installed by Helm".
*/}}
{{- define "internvl-operator.labels" -}}
helm.sh/chart: {{ include "internvl-operator.chart" . }}
{{ include "internvl-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: internvl-operator
{{- end }}

{{/*
Selector labels of the operator pod. They must never change between releases: a Deployment's
selector is immutable, so an upgrade that changed them would fail.
*/}}
{{- define "internvl-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "internvl-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
The service account the operator runs as: the release's full name when the chart creates it,
else serviceAccount.name (which must then exist), else "default".
*/}}
{{- define "internvl-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "internvl-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Name of the metrics Service: a Service name is a DNS-1035 label (63 characters), so the full name is
cut to 55 to leave room for "-metrics".
*/}}
{{- define "internvl-operator.metricsServiceName" -}}
{{- printf "%s-metrics" (include "internvl-operator.fullname" . | trunc 55 | trimSuffix "-") }}
{{- end }}

{{/*
The operator image: repository@digest when a digest is pinned, else repository:tag (tag defaults to
the chart's appVersion).
*/}}
{{- define "internvl-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
True (non-empty) when the operator watches the whole cluster: no watchNamespaces.
*/}}
{{- define "internvl-operator.clusterWide" -}}
{{- if not .Values.watchNamespaces }}true{{ end }}
{{- end }}

{{/*
The rules the operator needs inside a namespace it watches, shared by the ClusterRole (cluster-wide
mode) and each Role (namespaced mode). Each verb is one the operator's code uses; the table in
tests/chart/test_rbac.py names the call behind it, and a test runs the operator against the API
emulator and checks every recorded request against these rules.
*/}}
{{- define "internvl-operator.namespacedRules" -}}
# Our custom resources. Kopf lists and watches them, patches metadata (its finalizer, which its
# timers need, and its last-handled annotation); the operator GETs a fine-tune whose output another
# CR uses (fromFineTune) and the InternVLService a fine-tune created, and creates that service.
- apiGroups: ["internvl.ai"]
  resources: ["internvlfinetunes"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["internvl.ai"]
  resources: ["internvlservices"]
  verbs: ["get", "list", "watch", "patch", "create"]
# Status (phase, conditions, progress) goes through the status subresource, as a merge patch.
- apiGroups: ["internvl.ai"]
  resources: ["internvlfinetunes/status", "internvlservices/status"]
  verbs: ["patch"]
# Not an API call: children carry ownerReferences with blockOwnerDeletion, which clusters with the
# OwnerReferencesPermissionEnforcement admission plugin (e.g. OpenShift) allow only to whoever may
# update the owner's finalizers.
- apiGroups: ["internvl.ai"]
  resources: ["internvlfinetunes/finalizers", "internvlservices/finalizers"]
  verbs: ["update"]
# Data-check, training and merge Jobs: read their state, create them, delete one to suspend or
# re-run a failed stage.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "create", "delete"]
# A stage's pods (by label) for failure reasons, and rank 0's log for progress and error lines.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
- apiGroups: [""]
  resources: ["pods/log"]
  verbs: ["get"]
# Headless rendezvous Service of multi-node training and the serving Service: created, and the
# serving one merge-patched on every reconcile.
- apiGroups: [""]
  resources: ["services"]
  verbs: ["create", "patch"]
# Serving Deployment: read for ready replicas, created, merge-patched when the CR changes.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "create", "patch"]
# Optional autoscaler and disruption budget of a service: applied, and deleted when the CR drops them.
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["get", "create", "patch", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "create", "patch", "delete"]
# The PVCs and ConfigMap a CR names must exist before any pod is created (a clear Failed condition
# instead of a pod stuck in ContainerCreating). Read only; Secrets are never read.
- apiGroups: [""]
  resources: ["persistentvolumeclaims", "configmaps"]
  verbs: ["get"]
# Events on the CRs (phase changes, failures), from the operator and from Kopf.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- if .Values.peering.enabled }}
{{- if not (include "internvl-operator.clusterWide" .) }}
# Kopf peering in a watched namespace: the replicas find each other and keep alive in a KopfPeering.
- apiGroups: ["kopf.dev"]
  resources: ["kopfpeerings"]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}
{{- end }}
{{- end }}

{{/*
The operator's settings as environment variables. Each name is a field of
operator/internvl_operator/settings.py with the prefix INTERNVL_OPERATOR_ (a test checks that every
variable set here is one the operator reads). Resource maps are JSON, as the settings class parses them.
*/}}
{{- define "internvl-operator.env" -}}
- name: INTERNVL_OPERATOR_NAMESPACES
  value: {{ join "," .Values.watchNamespaces | quote }}
- name: INTERNVL_OPERATOR_WORKER_IMAGE
  value: {{ .Values.worker.image | quote }}
- name: INTERNVL_OPERATOR_VLLM_IMAGE
  value: {{ .Values.worker.vllmImage | quote }}
- name: INTERNVL_OPERATOR_IMAGE_PULL_POLICY
  value: {{ .Values.worker.imagePullPolicy | quote }}
- name: INTERNVL_OPERATOR_GPU_RESOURCE_NAME
  value: {{ .Values.worker.gpuResourceName | quote }}
- name: INTERNVL_OPERATOR_SHM_SIZE
  value: {{ .Values.worker.shmSize | quote }}
- name: INTERNVL_OPERATOR_DATACHECK_RESOURCES
  value: {{ .Values.worker.datacheckResources | toJson | quote }}
- name: INTERNVL_OPERATOR_MERGE_RESOURCES
  value: {{ .Values.worker.mergeResources | toJson | quote }}
- name: INTERNVL_OPERATOR_TRAIN_DEFAULT_RESOURCES
  value: {{ .Values.worker.trainDefaultResources | toJson | quote }}
- name: INTERNVL_OPERATOR_POLL_INTERVAL_S
  value: {{ .Values.operator.pollIntervalSeconds | quote }}
- name: INTERNVL_OPERATOR_API_TIMEOUT_S
  value: {{ .Values.operator.apiTimeoutSeconds | quote }}
- name: INTERNVL_OPERATOR_STRICT_MODEL_TYPES
  value: {{ .Values.operator.strictModelTypes | quote }}
- name: INTERNVL_OPERATOR_CLUSTER_DOMAIN
  value: {{ .Values.operator.clusterDomain | quote }}
- name: INTERNVL_OPERATOR_LIVENESS_PORT
  value: {{ .Values.operator.healthPort | quote }}
- name: INTERNVL_OPERATOR_METRICS_PORT
  value: {{ .Values.operator.metricsPort | quote }}
- name: INTERNVL_OPERATOR_PEERING
  value: {{ ternary .Values.peering.name "" .Values.peering.enabled | quote }}
{{- end }}

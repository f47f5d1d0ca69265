{{/* Chart name, truncated to the 63 characters Kubernetes names allow. */}}
{{- define "loraloop.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart, unless the release name already contains the chart name. */}}
{{- define "loraloop.fullname" -}}
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

{{/* chart-version, for the helm.sh/chart label. */}}
{{- define "loraloop.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every resource carries. */}}
{{- define "loraloop.labels" -}}
helm.sh/chart: {{ include "loraloop.chart" . }}
{{ include "loraloop.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: loraloop
{{- end }}

{{/* Labels that select this release's pods. */}}
{{- define "loraloop.selectorLabels" -}}
app.kubernetes.io/name: {{ include "loraloop.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Selector labels of one component: pass (dict "root" $ "component" "server"). */}}
{{- define "loraloop.componentSelectorLabels" -}}
{{ include "loraloop.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "loraloop.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "loraloop.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "loraloop.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "loraloop.secretName" -}}
{{- if .Values.secrets.create }}
{{- include "loraloop.fullname" . }}
{{- else }}
{{- required "secrets.existingSecret is required when secrets.create is false" .Values.secrets.existingSecret }}
{{- end }}
{{- end }}

{{- define "loraloop.claimName" -}}
{{- .Values.adapterStore.pvc.existingClaim | default (printf "%s-adapters" (include "loraloop.fullname" .)) }}
{{- end }}

{{/* s3://bucket/prefix of the S3 adapter store (type s3); refuses an empty bucket. */}}
{{- define "loraloop.storeUri" -}}
{{- $s3 := .Values.adapterStore.s3 }}
{{- $bucket := $s3.bucket | default "" | toString | trim }}
{{- if not $bucket }}
{{- fail "adapterStore.type is s3 but adapterStore.s3.bucket is empty: name the (existing) bucket that holds the adapter versions" }}
{{- end }}
{{- if or (contains "/" $bucket) (contains ":" $bucket) }}
{{- fail (printf "adapterStore.s3.bucket must be a bucket name only, not %q: put the key prefix in adapterStore.s3.prefix and an S3-compatible store's URL in adapterStore.s3.endpoint" $bucket) }}
{{- end }}
{{- $prefix := $s3.prefix | default "" | toString | trim | trimAll "/" }}
{{- printf "s3://%s/%s" $bucket $prefix | trimSuffix "/" }}
{{- end }}

{{/* Environment shared by server and learner: ConfigMap, Secret, store credentials. */}}
{{- define "loraloop.env" -}}
envFrom:
  - configMapRef:
      name: {{ include "loraloop.fullname" . }}
  - secretRef:
      name: {{ include "loraloop.secretName" . }}
{{- if and (eq .Values.adapterStore.type "s3") .Values.adapterStore.s3.existingSecret }}
  # AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY of the S3 adapter store.
  - secretRef:
      name: {{ .Values.adapterStore.s3.existingSecret }}
{{- end }}
{{- end }}

{{/* Volume mount and volume (list items) of the adapter store: the claim (pvc), or the
local cache of fetched versions, an emptyDir (s3). */}}
{{- define "loraloop.storeMounts" -}}
{{- if eq .Values.adapterStore.type "pvc" }}
- name: adapters
  mountPath: {{ .Values.adapterStore.mountPath }}
{{- else if eq .Values.adapterStore.type "s3" }}
- name: adapter-cache
  mountPath: {{ .Values.adapterStore.mountPath }}
{{- end }}
{{- end }}

{{- define "loraloop.storeVolumes" -}}
{{- if eq .Values.adapterStore.type "pvc" }}
- name: adapters
  persistentVolumeClaim:
    claimName: {{ include "loraloop.claimName" . }}
{{- else if eq .Values.adapterStore.type "s3" }}
- name: adapter-cache
  emptyDir:
    {{- with .Values.adapterStore.s3.cacheSizeLimit }}
    sizeLimit: {{ . }}
    {{- else }} {}
    {{- end }}
{{- end }}
{{- end }}

{{/* Container resources with the GPU added: pass (dict "resources" ... "gpu" ...). */}}
{{- define "loraloop.resources" -}}
{{- $res := deepCopy (.resources | default dict) }}
{{- if .gpu.enabled }}
{{- $limits := get $res "limits" | default dict }}
{{- $_ := set $limits .gpu.resource (.gpu.count | toString) }}
{{- $_ := set $res "limits" $limits }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{/* The server's probes: native gRPC health checks on the plaintext port; with TLS (which
the kubelet's gRPC probes cannot speak) tls.probeCommand, or a TCP check of the port.
Pass (dict "root" $ "service" "loraloop.v1.LoraLoop") ("service" optional). */}}
{{- define "loraloop.serverProbe" -}}
{{- $tls := .root.Values.tls }}
{{- if and .root.Values.server.http.enabled (not $tls.clientAuth) (not $tls.probeCommand) }}
httpGet:
  path: /health{{ with .service }}?service={{ . }}{{ end }}
  port: http
  scheme: {{ ternary "HTTPS" "HTTP" $tls.enabled }}
{{- else if not $tls.enabled }}
grpc:
  port: {{ .root.Values.server.port }}
  {{- with .service }}
  service: {{ . }}
  {{- end }}
{{- else if $tls.probeCommand }}
exec:
  command:
    {{- toYaml $tls.probeCommand | nindent 4 }}
{{- else }}
tcpSocket:
  port: {{ .root.Values.server.port }}
{{- end }}
{{- end }}

{{/* TLS files of the server (env list items), from the mounted Secret. */}}
{{- define "loraloop.tlsEnv" -}}
{{- if .Values.tls.enabled }}
- name: LORALOOP_TLS_CERT_FILE
  value: {{ printf "%s/tls.crt" .Values.tls.mountPath | quote }}
- name: LORALOOP_TLS_KEY_FILE
  value: {{ printf "%s/tls.key" .Values.tls.mountPath | quote }}
{{- if .Values.tls.clientAuth }}
- name: LORALOOP_TLS_CLIENT_CA_FILE
  value: {{ printf "%s/ca.crt" .Values.tls.mountPath | quote }}
{{- end }}
{{- end }}
{{- end }}

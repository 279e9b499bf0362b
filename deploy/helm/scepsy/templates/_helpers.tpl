{{/* Names: RELEASE-scepsy, or RELEASE when the release name already contains "scepsy". */}}
{{- define "scepsy.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "scepsy.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "scepsy.labels" -}}
{{ include "scepsy.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: scepsy
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "scepsy.image" -}}
{{- printf "%s:%s" .image.repository (.image.tag | default .root.Chart.AppVersion) -}}
{{- end -}}

{{/* The Secret and key holding the Redis URL every service reads (SCEPSY_REDIS_URL). */}}
{{- define "scepsy.redisSecretName" -}}
{{- if and (has .Values.redis.mode (list "external" "sentinel")) .Values.redis.existingSecret -}}
{{- .Values.redis.existingSecret -}}
{{- else -}}
{{- printf "%s-redis" (include "scepsy.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "scepsy.redisSecretKey" -}}
{{- if and (has .Values.redis.mode (list "external" "sentinel")) .Values.redis.existingSecret -}}
{{- .Values.redis.existingSecretKey -}}
{{- else -}}
redis-url
{{- end -}}
{{- end -}}

{{/* The internal Redis password: the value, else the one already in the cluster, else new. */}}
{{- define "scepsy.redisPassword" -}}
{{- if .Values.redis.password -}}
{{- .Values.redis.password -}}
{{- else -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (printf "%s-redis" (include "scepsy.fullname" .)) -}}
{{- if and $existing (index $existing.data "redis-password") -}}
{{- index $existing.data "redis-password" | b64dec -}}
{{- else -}}
{{- randAlphaNum 32 -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "scepsy.checkValues" -}}
{{- if and (eq .Values.redis.mode "sentinel") (not .Values.redis.existingSecret) (not .Values.redis.sentinel.hosts) -}}
{{- fail "redis.sentinel.hosts: required with redis.mode sentinel (host:port of each sentinel; or set redis.existingSecret)" -}}
{{- end -}}
{{- if not (has .Values.redis.mode (list "internal" "external" "sentinel")) -}}
{{- fail (printf "redis.mode: must be internal, external or sentinel, got %q" .Values.redis.mode) -}}
{{- end -}}
{{- if and (eq .Values.redis.mode "external") (not .Values.redis.existingSecret) (not .Values.redis.external.host) -}}
{{- fail "redis.external.host: required with redis.mode external (or set redis.existingSecret)" -}}
{{- end -}}
{{- if and (not .Values.router.apiKeys.keys) (not .Values.router.apiKeys.existingSecret) (not .Values.router.allowUnauthenticated) -}}
{{- fail "router.apiKeys: give keys or existingSecret (or set router.allowUnauthenticated: true)" -}}
{{- end -}}
{{- if and (or .Values.placer.useDeclaredCluster .Values.agent.useDeclaredCluster) (not .Values.cluster) -}}
{{- fail "cluster: required when placer.useDeclaredCluster or agent.useDeclaredCluster is true" -}}
{{- end -}}
{{- end -}}

{{/* Environment every Scepsy container gets. */}}
{{- define "scepsy.env" -}}
- name: SCEPSY_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "scepsy.redisSecretName" . }}
      key: {{ include "scepsy.redisSecretKey" . }}
- name: SCEPSY_NAMESPACE
  value: {{ .Values.keyNamespace | quote }}
- name: SCEPSY_HOST
  value: "0.0.0.0"
- name: SCEPSY_PORT
  value: {{ .Values.grpcPort | quote }}
- name: SCEPSY_METRICS_PORT
  value: {{ .Values.metricsPort | quote }}
- name: SCEPSY_LOG_LEVEL
  value: {{ .Values.logLevel | quote }}
{{- end -}}

{{/* gRPC probes on the service's health service (grpc.health.v1). */}}
{{- define "scepsy.probes" -}}
startupProbe:
  grpc:
    port: {{ .Values.grpcPort }}
  {{- toYaml .Values.probes.startup | nindent 2 }}
readinessProbe:
  grpc:
    port: {{ .Values.grpcPort }}
  {{- toYaml .Values.probes.readiness | nindent 2 }}
livenessProbe:
  grpc:
    port: {{ .Values.grpcPort }}
  {{- toYaml .Values.probes.liveness | nindent 2 }}
{{- end -}}

{{- define "scepsy.extraEnv" -}}
{{- range $name, $value := . }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end -}}
{{- end -}}

{{- define "fdp.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "fdp.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "fdp.labels" -}}
app.kubernetes.io/name: {{ include "fdp.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "fdp.selector" -}}
app.kubernetes.io/name: {{ include "fdp.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "fdp.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "fdp.secretName" -}}
{{- .Values.existingSecret | default (printf "%s-env" (include "fdp.fullname" .)) -}}
{{- end -}}

{{/* The config file as mounted: the user's, with what the chart owns filled in. */}}
{{- define "fdp.config" -}}
{{- $config := deepCopy .Values.config -}}
{{- $server := merge (dict "host" "0.0.0.0" "port" 8080) (get $config "server" | default dict) -}}
{{- $_ := set $config "server" $server -}}
{{- $cache := merge (get $config "cache" | default dict) (dict "store" "/var/cache/fdp") -}}
{{- if hasPrefix "s3://" $cache.store -}}
{{- $_ := set $cache "local" (merge (get $cache "local" | default dict) (dict "store" "/var/cache/fdp")) -}}
{{- end -}}
{{- $_ := set $config "cache" $cache -}}
{{- if .Values.eodagProviders -}}
{{- $_ := set $config "eodag" (merge (get $config "eodag" | default dict) (dict "providers_file" "providers.yml")) -}}
{{- end -}}
{{- toYaml $config -}}
{{- end -}}

{{/* Environment every fdp container gets: Redis, and the credentials Secret. */}}
{{- define "fdp.env" -}}
- name: FDP_CONFIG
  value: /etc/fdp/config.yaml
- name: FDP_QUEUE__REDIS_URL
{{- if eq .Values.redis.mode "bundled" }}
  value: {{ printf "redis://%s-redis:6379/0" (include "fdp.fullname" .) | quote }}
{{- else if .Values.redis.existingSecret }}
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret }}
      key: redis-url
{{- else }}
  value: {{ .Values.redis.url | quote }}
{{- end }}
- name: HOME
  value: /tmp
{{- end -}}

{{- define "fdp.envFrom" -}}
{{- if or .Values.existingSecret .Values.secretEnv }}
envFrom:
  - secretRef:
      name: {{ include "fdp.secretName" . }}
{{- end }}
{{- end -}}

{{/* Volumes of every fdp pod: the config, a writable /tmp, the local cache folder. */}}
{{- define "fdp.volumes" -}}
- name: config
  configMap:
    name: {{ include "fdp.fullname" .root }}
- name: tmp
  emptyDir: {}
- name: cache
  emptyDir:
    sizeLimit: {{ .cacheSize }}
{{- end -}}

{{- define "fdp.mounts" -}}
- name: config
  mountPath: /etc/fdp
  readOnly: true
- name: tmp
  mountPath: /tmp
- name: cache
  mountPath: /var/cache/fdp
{{- end -}}

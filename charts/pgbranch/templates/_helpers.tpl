{{/* Chart name, truncated to fit DNS label limits. */}}
{{- define "pgbranch.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: release-chart unless the release already contains the chart name. */}}
{{- define "pgbranch.fullname" -}}
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

{{- define "pgbranch.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every object of the chart carries. */}}
{{- define "pgbranch.labels" -}}
helm.sh/chart: {{ include "pgbranch.chart" . }}
app.kubernetes.io/name: {{ include "pgbranch.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: pgbranch
{{- end }}

{{- define "pgbranch.operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pgbranch.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "pgbranch.storage.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pgbranch.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: storage
{{- end }}

{{- define "pgbranch.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (printf "%s-operator" (include "pgbranch.fullname" .)) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "pgbranch.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "pgbranch.storage.name" -}}
{{- printf "%s-storage" (include "pgbranch.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "pgbranch.storage.secretName" -}}
{{- if .Values.storage.enabled }}
{{- default (printf "%s-storage-token" (include "pgbranch.fullname" .)) .Values.storage.auth.existingSecret }}
{{- else }}
{{- required "storage.auth.existingSecret (the external storage service's token) is required when storage.enabled is false" .Values.storage.auth.existingSecret }}
{{- end }}
{{- end }}

{{- define "pgbranch.storage.claimName" -}}
{{- printf "%s-storage-data" (include "pgbranch.fullname" .) }}
{{- end }}

{{/* The URL the operator reaches the storage service at. */}}
{{- define "pgbranch.storage.url" -}}
{{- if .Values.storage.enabled }}
{{- printf "http://%s.%s.svc:%d" (include "pgbranch.storage.name" .) .Release.Namespace (int .Values.storage.port) }}
{{- else }}
{{- required "storage.externalUrl is required when storage.enabled is false" .Values.storage.externalUrl }}
{{- end }}
{{- end }}

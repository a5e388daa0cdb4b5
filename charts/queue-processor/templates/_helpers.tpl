{{/*
Helpers for the queue-processor chart. Every helper is prefixed with the chart name so that a
parent chart including this one cannot collide with them.
*/}}

{{/* The chart name, overridable with nameOverride. */}}
{{- define "queue-processor.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every resource name: `<release>-<chart>`, or just `<release>` when the release name
already contains the chart name. Truncated to 63 characters (the DNS label limit).
*/}}
{{- define "queue-processor.fullname" -}}
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

{{/* `name-version` for the helm.sh/chart label. */}}
{{- define "queue-processor.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object of the release. */}}
{{- define "queue-processor.labels" -}}
helm.sh/chart: {{ include "queue-processor.chart" . }}
{{ include "queue-processor.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: queue-processor
{{- end }}

{{/* Labels that select the operator pods (immutable once installed: keep them stable). */}}
{{- define "queue-processor.selectorLabels" -}}
app.kubernetes.io/name: {{ include "queue-processor.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Name of the operator's ServiceAccount. */}}
{{- define "queue-processor.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "queue-processor.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image reference: repository plus digest, or plus tag (default: appVersion). */}}
{{- define "queue-processor.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The image of worker and gateway pods: operator.workerImage, or the chart's image. */}}
{{- define "queue-processor.workerImage" -}}
{{- default (include "queue-processor.image" .) .Values.operator.workerImage }}
{{- end }}

{{/* Name of the leader-election Lease. */}}
{{- define "queue-processor.leaseName" -}}
{{- default (include "queue-processor.fullname" .) .Values.operator.leaderElection.leaseName }}
{{- end }}

{{/* Namespace of an optional monitoring object: its own value, or the release namespace. */}}
{{- define "queue-processor.monitoringNamespace" -}}
{{- default .root.Release.Namespace .namespace }}
{{- end }}

{{/*
Fail early on value combinations the schema cannot express.
*/}}
{{- define "queue-processor.validate" -}}
{{- if and (gt (int .Values.operator.replicas) 1) (not .Values.operator.leaderElection.enabled) }}
{{- fail "operator.replicas > 1 needs operator.leaderElection.enabled=true: two active operators would fight over every QueueProcessor" }}
{{- end }}
{{- end }}

{{/* Names and labels shared by every template. */}}

{{- define "dinoflow.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* release-chart, or just the release name when it already contains the chart name. */}}
{{- define "dinoflow.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "dinoflow.operator.fullname" -}}
{{- printf "%s-operator" (include "dinoflow.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every object except the instance label, which selectorLabels carries. */}}
{{- define "dinoflow.commonLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/part-of: dinoflow
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
{{- end -}}

{{- define "dinoflow.labels" -}}
{{ include "dinoflow.commonLabels" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "dinoflow.operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dinoflow.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "dinoflow.operator.labels" -}}
{{ include "dinoflow.commonLabels" . }}
{{ include "dinoflow.operator.selectorLabels" . }}
{{- end -}}

{{- define "dinoflow.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "dinoflow.operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "dinoflow.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Trainer image of jobs without spec.cluster.image. */}}
{{- define "dinoflow.trainerImage" -}}
{{- printf "%s:%s" .Values.trainerImage.repository (default .Chart.AppVersion .Values.trainerImage.tag) -}}
{{- end -}}

{{/* Secret holding the progress key under `key`: the user's, or the one the chart generates. */}}
{{- define "dinoflow.progressKeySecret" -}}
{{- default (printf "%s-progress-key" (include "dinoflow.fullname" .) | trunc 63 | trimSuffix "-") .Values.progressKey.existingSecret -}}
{{- end -}}

{{/* Secret holding the progress endpoint's tls.crt, tls.key and ca.crt: the user's, or the one
the chart generates. */}}
{{- define "dinoflow.progressTlsSecret" -}}
{{- default (printf "%s-progress-tls" (include "dinoflow.fullname" .) | trunc 63 | trimSuffix "-") .Values.progressTls.existingSecret -}}
{{- end -}}

// The shape a Dinoflow dashboard must have, from Grafana's published schema (@grafana/schema,
// version pinned in scripts/npm/package.json): the dashboard model, and for each panel type
// we use, the options and field config of that panel plugin. tests/tests/observability.rs
// type-checks every dashboard JSON as a `StrictDashboard` literal with `tsc --noEmit`, so a
// misspelled or misplaced key (excess property), a missing required option or a wrong value
// type fails the test suite.
import type {
  Dashboard,
  DataQuery,
  DataSourceRef,
  FieldConfig,
  FieldConfigSource,
  Panel,
} from '@grafana/schema';
import type * as stat from '@grafana/schema/dist/esm/raw/composable/stat/panelcfg/x/StatPanelCfg_types.gen';
import type * as table from '@grafana/schema/dist/esm/raw/composable/table/panelcfg/x/TablePanelCfg_types.gen';
import type * as timeseries from '@grafana/schema/dist/esm/raw/composable/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen';

// JSON cannot name a TypeScript enum member: accept each enum's values as literals instead
// (`"list"` for `LegendDisplayMode.List`), recursively.
type Json<T> = T extends string
  ? `${T}`
  : T extends number | boolean | null | undefined
    ? T
    : T extends Array<infer U>
      ? Array<Json<U>>
      : T extends object
        ? { [K in keyof T]: Json<T[K]> }
        : T;

// A Prometheus query as Grafana's Prometheus data source stores it (public/app/plugins/
// datasource/prometheus dataquery.cue), on top of the common DataQuery.
export type PromQuery = Json<DataQuery> & {
  datasource: Json<DataSourceRef>;
  expr: string;
  legendFormat?: string;
  instant?: boolean;
  range?: boolean;
  format?: 'time_series' | 'table' | 'heatmap';
  interval?: string;
  exemplar?: boolean;
  editorMode?: 'code' | 'builder';
};

type Common = Omit<Json<Panel>, 'type' | 'options' | 'fieldConfig' | 'targets'> & {
  datasource: Json<DataSourceRef>;
  targets: PromQuery[];
};
type Fields<Custom> = Omit<Json<FieldConfigSource>, 'defaults'> & {
  defaults: Omit<Json<FieldConfig>, 'custom'> & { custom?: Json<Custom> };
};

export type TimeseriesPanel = Common & {
  type: 'timeseries';
  options: Json<timeseries.Options>;
  fieldConfig: Fields<timeseries.FieldConfig>;
};
export type StatPanel = Common & {
  type: 'stat';
  options: Json<stat.Options>;
  fieldConfig: Fields<Record<string, never>>;
};
export type TablePanel = Common & {
  type: 'table';
  options: Json<table.Options>;
  fieldConfig: Fields<table.FieldConfig>;
};

export type StrictDashboard = Omit<Json<Dashboard>, 'panels'> & {
  uid: string;
  title: string;
  panels: Array<TimeseriesPanel | StatPanel | TablePanel>;
};

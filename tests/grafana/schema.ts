// The shape deploy/grafana/voicefleet.json must have: Grafana's own dashboard types (npm's
// @grafana/schema, generated from Grafana's dashboard and panel schemas), with each panel's
// options and field config narrowed to its plugin's types (timeseries, stat) and each query to
// Grafana's DataQuery plus the Prometheus fields used. tests/test_metrics.py writes the JSON as a
// TypeScript literal typed `Board` and runs `tsc --strict`: an unknown field, a missing required
// one or a value outside an enum is an error, as it would be where Grafana loads the dashboard.
import type {
  DataQuery,
  Dashboard,
  FieldConfigSource,
  Panel,
  RowPanel,
} from "@grafana/schema";
import type * as stat from "@grafana/schema/dist/esm/raw/composable/stat/panelcfg/x/StatPanelCfg_types.gen";
import type * as timeseries from "@grafana/schema/dist/esm/raw/composable/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen";

// JSON has no enums: a string enum's members are their string values here.
type Json<T> = T extends string
  ? `${T}`
  : T extends number | boolean | null | undefined
    ? T
    : T extends Array<infer U>
      ? Array<Json<U>>
      : T extends object
        ? { [K in keyof T]: Json<T[K]> }
        : T;

// The Prometheus query fields the dashboard uses (Grafana's Prometheus data source).
type PrometheusQuery = Json<DataQuery> & {
  expr: string;
  legendFormat?: string;
  range?: boolean;
  instant?: boolean;
};

type PanelOf<Type extends string, Options, Custom> = Omit<
  Json<Panel>,
  "type" | "options" | "fieldConfig" | "targets"
> & {
  type: Type;
  options: Json<Options>;
  fieldConfig: Omit<Json<FieldConfigSource>, "defaults"> & {
    defaults: Omit<Json<FieldConfigSource["defaults"]>, "custom"> & { custom?: Json<Custom> };
  };
  targets: PrometheusQuery[];
};

type Row = Omit<Json<RowPanel>, "panels"> & { type: "row"; panels: [] };

export type Board = Omit<Json<Dashboard>, "panels"> & {
  panels: Array<
    | PanelOf<"timeseries", timeseries.Options, timeseries.FieldConfig>
    | PanelOf<"stat", stat.Options, never>
    | Row
  >;
};

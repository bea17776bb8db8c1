// The plot kinds the project draws, as Vega-Lite specs with their data inline: series over x
// (lines or grouped bars), an expert heatmap (layers x experts) and a timeline of spans per lane.
// Every spec has a title, axis titles (with units: the caller writes them), a legend, a log axis
// where the values span decades, and a caption (subtitle) naming the machine and the date.
import os from 'node:os';

import type { TopLevelSpec } from 'vega-lite';

import { PLOT_FONT } from './render.js';

const SCHEMA = 'https://vega.github.io/schema/vega-lite/v6.json';

/** What every plot carries besides its data. */
export interface PlotMeta {
  title: string;
  /** Extra subtitle line before the caption (settings, the model, the trace). */
  note?: string;
  /** The machine the figures come from (default: this CPU's model and thread count). */
  machine?: string;
  /** When the figures were measured (default: now). */
  date?: Date;
}

/** This machine in a few words: CPU model and logical CPU count. */
export function machineName(): string {
  const cpu = os.cpus()[0]?.model.trim().replace(/\s+/g, ' ') ?? 'unknown CPU';
  return `${cpu}, ${os.availableParallelism()} CPUs`;
}

/** 'machine · 2026-12-02 01:30 UTC' */
export function caption(meta: Pick<PlotMeta, 'machine' | 'date'>): string {
  const d = meta.date ?? new Date();
  return `${meta.machine ?? machineName()} · ${d.toISOString().slice(0, 16).replace('T', ' ')} UTC`;
}

function titleOf(meta: PlotMeta): { text: string; subtitle: string[] } {
  return { text: meta.title, subtitle: [...(meta.note ? [meta.note] : []), caption(meta)] };
}

const CONFIG = {
  font: PLOT_FONT,
  background: 'white',
  title: { fontSize: 14, subtitleFontSize: 11, subtitleColor: '#555', anchor: 'start' as const },
  axis: { titleFontSize: 12, labelFontSize: 11 },
  legend: { titleFontSize: 12, labelFontSize: 11, labelLimit: 320, titleLimit: 400 },
};

/**
 * 'auto': log when the positive values span two decades or more (a linear axis would flatten the
 * small ones). Non-positive values cannot sit on a log axis: they keep it linear.
 */
export function wantsLog(values: number[], setting: boolean | 'auto' | undefined): boolean {
  if (setting === true || setting === false) return setting;
  const v = values.filter((x) => Number.isFinite(x));
  if (v.length < 2 || v.some((x) => x <= 0)) return false;
  return Math.max(...v) / Math.min(...v) >= 100;
}

export interface Series {
  name: string;
  /** One value per chart x; null or non-finite = no point. */
  values: (number | null)[];
  /** Spread per x (e.g. min and max over repetitions): drawn as an error bar. */
  lo?: (number | null)[];
  hi?: (number | null)[];
  /** A reference (a limit, a ceiling, a peer's line): dashed. */
  dashed?: boolean;
}

export interface SeriesChart extends PlotMeta {
  /** The x values, in order: labels (ordinal axis) or numbers (quantitative axis with xType). */
  x: (string | number)[];
  xTitle: string;
  yTitle: string;
  legendTitle?: string;
  series: Series[];
  kind?: 'line' | 'bar';
  /** 'ordinal' (default) keeps x in the given order, evenly spaced. */
  xType?: 'ordinal' | 'quantitative';
  logX?: boolean;
  logY?: boolean | 'auto';
  /** d3-format of the y axis labels (e.g. '.0%' for shares given as 0-1). */
  yFormat?: string;
  yDomain?: [number, number];
  width?: number;
  height?: number;
}

interface Row { x: string | number; series: string; value: number; lo?: number; hi?: number }

/** Lines (with points) or grouped bars of named series over x. */
export function seriesChart(c: SeriesChart): TopLevelSpec {
  const rows: Row[] = [];
  const ok = (v: number | null | undefined): v is number => v !== null && v !== undefined && Number.isFinite(v);
  for (const s of c.series) {
    c.x.forEach((x, i) => {
      const v = s.values[i];
      if (!ok(v)) return;
      const row: Row = { x: (c.xType ?? 'ordinal') === 'ordinal' ? String(x) : x, series: s.name, value: v };
      const lo = s.lo?.[i], hi = s.hi?.[i];
      if (ok(lo) && ok(hi)) { row.lo = lo; row.hi = hi; }
      rows.push(row);
    });
  }
  const log = wantsLog(rows.flatMap((r) => [r.value, ...(r.lo !== undefined ? [r.lo, r.hi!] : [])]), c.logY ?? 'auto');
  const names = c.series.map((s) => s.name);
  const dashedNames = new Set(c.series.filter((s) => s.dashed).map((s) => s.name));
  const xType = c.xType ?? 'ordinal';
  const legendTitle = c.legendTitle ?? 'series';
  const x = {
    field: 'x', type: xType, title: c.xTitle,
    ...(xType === 'ordinal' ? { sort: c.x.map(String), axis: { labelAngle: 0 } } : {}),
    ...(c.logX ? { scale: { type: 'log' as const } } : {}),
  };
  const yScale = { ...(log ? { type: 'log' as const } : { zero: c.kind === 'bar' }), ...(c.yDomain ? { domain: c.yDomain } : {}) };
  const y = { field: 'value', type: 'quantitative' as const, title: c.yTitle, scale: yScale, ...(c.yFormat ? { axis: { format: c.yFormat } } : {}) };
  const color = { field: 'series', type: 'nominal' as const, title: legendTitle, sort: names, scale: { domain: names } };
  const bar = c.kind === 'bar';
  const layers: unknown[] = [];
  if (bar) {
    // Unstacked: grouped bars, and on a log axis a stack's zero base would not exist.
    layers.push({ mark: { type: 'bar' }, encoding: { x, xOffset: { field: 'series', sort: names }, y: { ...y, stack: null }, color } });
  } else {
    layers.push({
      mark: { type: 'line', point: { size: 40 }, strokeWidth: 2 },
      encoding: {
        x, y, color: { ...color, legend: { symbolType: 'stroke', symbolStrokeWidth: 2.5, symbolSize: 300 } },
        strokeDash: { field: 'series', type: 'nominal', title: legendTitle, sort: names,
          scale: { domain: names, range: names.map((n) => (dashedNames.has(n) ? [6, 4] : [1, 0])) } },
      },
    });
  }
  if (rows.some((r) => r.lo !== undefined)) {
    layers.push({
      transform: [{ filter: 'isValid(datum.lo)' }],
      mark: { type: 'rule', strokeWidth: 1.5 },
      encoding: { x, ...(bar ? { xOffset: { field: 'series', sort: names } } : {}), y: { ...y, field: 'lo' }, y2: { field: 'hi' }, color },
    });
  }
  return {
    $schema: SCHEMA,
    title: titleOf(c),
    width: c.width ?? 560,
    height: c.height ?? 320,
    data: { values: rows },
    layer: layers,
    config: CONFIG,
  } as TopLevelSpec;
}

export interface HeatmapChart extends PlotMeta {
  /** [rows][columns] values, e.g. [MoE layer][expert] share of the layer's routed tokens. */
  cells: ArrayLike<number>[];
  rowTitle: string;
  colTitle: string;
  colorTitle: string;
  /** Ids of the rows (default 0..rows-1). */
  rowIds?: number[];
  /** d3-format of the colour legend's labels. */
  colorFormat?: string;
}

/** A rows x columns heatmap with id-labelled axes and a colour legend. */
export function heatmapChart(c: HeatmapChart): TopLevelSpec {
  const R = c.cells.length;
  const C = R ? c.cells[0]!.length : 0;
  const values: { row: number; col: number; value: number }[] = [];
  for (let r = 0; r < R; r++) for (let k = 0; k < C; k++) values.push({ row: c.rowIds?.[r] ?? r, col: k, value: c.cells[r]![k]! });
  // Cells 4..24 px wide; a label every n experts so that the ids never overlap.
  const cell = Math.max(4, Math.min(24, Math.floor(960 / Math.max(1, C))));
  const rowCell = Math.max(8, Math.min(24, Math.floor(640 / Math.max(1, R))));
  // A label every 1, 2, 5, 10, 20, ... ids: the smallest step whose labels do not overlap.
  const nice = (min: number) => [1, 2, 5, 10, 20, 50, 100, 200, 500].find((n) => n >= min) ?? 1000;
  const colEvery = nice(24 / cell), rowEvery = nice(14 / rowCell);
  const labelExpr = (n: number) => (n > 1 ? `datum.value % ${n} === 0 ? datum.label : ''` : 'datum.label');
  return {
    $schema: SCHEMA,
    title: titleOf(c),
    data: { values },
    width: { step: cell },
    height: { step: rowCell },
    mark: { type: 'rect', stroke: '#e8e8e8', strokeWidth: 0.5 },
    encoding: {
      x: { field: 'col', type: 'ordinal', title: c.colTitle, axis: { labelAngle: 0, labelExpr: labelExpr(colEvery), ticks: true } },
      y: { field: 'row', type: 'ordinal', title: c.rowTitle, axis: { labelExpr: labelExpr(rowEvery) } },
      color: {
        field: 'value', type: 'quantitative', title: c.colorTitle, // White = never routed; darker = a larger share.
        scale: { range: ['#ffffff', '#c6dbef', '#6baed6', '#2171b5', '#08306b'], domainMin: 0 },
        legend: { gradientLength: Math.max(120, Math.min(320, R * rowCell)), ...(c.colorFormat ? { format: c.colorFormat } : {}) },
      },
    },
    config: { ...CONFIG, axis: { ...CONFIG.axis, grid: false } },
  } as TopLevelSpec;
}

export interface Span {
  /** One panel row per group (e.g. 'MoE layer 0'). */
  group: string;
  /** Optional panel column (e.g. 'PN 1', 'PN 4'). */
  column?: string;
  /** The thread or stream the span ran on. */
  lane: string;
  /** Legend entry (e.g. dispatch, expert GEMM, combine). */
  phase: string;
  /** Short text drawn on the bar when it is wide enough (e.g. the chunk number). */
  label?: string;
  startMs: number;
  endMs: number;
}

export interface TimelineChart extends PlotMeta {
  spans: Span[];
  xTitle: string;
  laneTitle: string;
  /** Legend order and the phases' colours follow this order. */
  phases: string[];
  /** One colour per phase (default: vega's category palette). */
  colors?: string[];
  width?: number;
}

/** Bars from start to end on each lane, one panel per group (and column), coloured by phase. */
export function timelineChart(c: TimelineChart): TopLevelSpec {
  const lanes = [...new Set(c.spans.map((s) => s.lane))];
  const groups = [...new Set(c.spans.map((s) => s.group))];
  const columns = [...new Set(c.spans.map((s) => s.column).filter((x): x is string => x !== undefined))];
  const values = c.spans.map((s) => ({ ...s, label: s.label ?? '' }));
  const x = { field: 'startMs', type: 'quantitative', title: c.xTitle };
  const y = { field: 'lane', type: 'nominal', title: c.laneTitle, sort: lanes };
  return {
    $schema: SCHEMA,
    title: titleOf(c),
    data: { values },
    facet: {
      row: { field: 'group', type: 'nominal', sort: groups, title: null, header: { labelAngle: 0, labelAlign: 'left', labelFontSize: 11 } },
      ...(columns.length ? { column: { field: 'column', type: 'nominal', sort: columns, title: null, header: { labelFontSize: 12 } } } : {}),
    },
    spec: {
      width: c.width ?? (columns.length > 1 ? 360 : 640),
      height: { step: 22 },
      layer: [
        {
          mark: { type: 'bar', cornerRadius: 2, stroke: 'white', strokeWidth: 0.5 },
          encoding: {
            x, x2: { field: 'endMs' }, y,
            color: { field: 'phase', type: 'nominal', title: 'phase', sort: c.phases, scale: { domain: c.phases, ...(c.colors ? { range: c.colors } : {}) } },
          },
        },
        {
          mark: { type: 'text', align: 'left', dx: 2, fontSize: 9, color: 'white' },
          encoding: { x, y, text: { field: 'label' } },
        },
      ],
    },
    config: CONFIG,
  } as TopLevelSpec;
}

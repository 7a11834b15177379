//! The timeline picture: membership per zone and delivery latency over the run, with
//! fault windows shaded.

use std::path::Path;

use plotters::prelude::*;

use crate::engine::Simulation;

const SHADE: RGBColor = RGBColor(200, 200, 200);

fn seconds(nanos: u64) -> f64 {
    nanos as f64 / 1e9
}

impl Simulation {
    /// Draws the run's timeline to an SVG file at `path`.
    pub fn draw_timeline(&self, path: &Path) -> Result<(), String> {
        let root = SVGBackend::new(path, (1000, 640)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let (top, bottom) = root.split_vertically(340);
        self.draw_members(&top).map_err(|e| e.to_string())?;
        self.draw_latency(&bottom).map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())
    }

    fn shade_windows<DB: DrawingBackend>(
        &self,
        chart: &mut ChartContext<
            '_,
            DB,
            Cartesian2d<
                plotters::coord::types::RangedCoordf64,
                plotters::coord::types::RangedCoordf64,
            >,
        >,
        top: f64,
    ) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
        let windows = self.seen.windows.iter().map(|(start, end)| {
            Rectangle::new(
                [(seconds(*start), 0.0), (seconds(*end), top)],
                SHADE.mix(0.5).filled(),
            )
        });
        chart.draw_series(windows)?;
        Ok(())
    }

    fn draw_members<DB: DrawingBackend>(
        &self,
        area: &DrawingArea<DB, plotters::coord::Shift>,
    ) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
        let zones = self.zone_names();
        let largest = self
            .scenario
            .topology
            .zones
            .iter()
            .map(|z| z.nodes)
            .max()
            .unwrap_or(1) as f64;
        let mut chart = ChartBuilder::on(area)
            .caption(
                "members of each zone, as the live nodes see them (fault windows shaded)",
                ("sans-serif", 16),
            )
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(40)
            .build_cartesian_2d(0.0..seconds(self.end), 0.0..largest * 1.1)?;
        chart
            .configure_mesh()
            .x_desc("simulated seconds")
            .y_desc("members")
            .draw()?;
        self.shade_windows(&mut chart, largest * 1.1)?;
        for (index, zone) in zones.iter().enumerate() {
            let color = Palette99::pick(index).to_rgba();
            let points = self
                .seen
                .samples
                .iter()
                .map(|(at, per_zone)| (seconds(*at), per_zone[index]));
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))?
                .label(format!("zone {zone}"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        Ok(())
    }

    /// The p99 of publish-to-delivery latency for invalidations published in each second.
    fn latency_by_second(&self) -> Vec<(f64, f64)> {
        let seconds_total = (self.end / 1_000_000_000) as usize + 1;
        let mut buckets: Vec<Vec<u64>> = vec![Vec::new(); seconds_total];
        for publication in &self.seen.publications {
            let bucket = (publication.at / 1_000_000_000) as usize;
            let latencies = publication.delivered.times().map(|at| at - publication.at);
            if let Some(bucket) = buckets.get_mut(bucket) {
                bucket.extend(latencies);
            }
        }
        buckets
            .into_iter()
            .enumerate()
            .filter(|(_, latencies)| !latencies.is_empty())
            .map(|(second, mut latencies)| {
                (
                    second as f64,
                    crate::report::percentile(&mut latencies, 0.99),
                )
            })
            .collect()
    }

    fn draw_latency<DB: DrawingBackend>(
        &self,
        area: &DrawingArea<DB, plotters::coord::Shift>,
    ) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
        let points = self.latency_by_second();
        let highest = points.iter().map(|(_, ms)| *ms).fold(1.0, f64::max) * 1.1;
        let mut chart = ChartBuilder::on(area)
            .caption(
                "delivery latency, p99 of the invalidations published each second",
                ("sans-serif", 16),
            )
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..seconds(self.end), 0.0..highest)?;
        chart
            .configure_mesh()
            .x_desc("simulated seconds")
            .y_desc("ms")
            .draw()?;
        self.shade_windows(&mut chart, highest)?;
        chart.draw_series(LineSeries::new(points, BLUE.stroke_width(2)))?;
        Ok(())
    }
}

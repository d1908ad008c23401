package de.medizininformatik_initiative.omi.dsf;

import java.time.LocalDate;
import java.util.List;
import java.util.Map;

import dev.dsf.bpe.v1.ProcessPluginDefinition;

/** DSF process plugin definition (API v1); everything it lists comes from the generated index. */
public class OmiProcessPluginDefinition implements ProcessPluginDefinition
{
	private final PluginIndex index = PluginIndex.get();

	@Override
	public String getName()
	{
		return index.getName();
	}

	@Override
	public String getVersion()
	{
		return index.getVersion();
	}

	@Override
	public LocalDate getReleaseDate()
	{
		return index.getReleaseDate();
	}

	@Override
	public List<String> getProcessModels()
	{
		return index.getProcessModels();
	}

	@Override
	public Map<String, List<String>> getFhirResourcesByProcessId()
	{
		return index.getFhirResourcesByProcessId();
	}

	@Override
	public List<Class<?>> getSpringConfigurations()
	{
		return List.of(OmiConfig.class);
	}
}
